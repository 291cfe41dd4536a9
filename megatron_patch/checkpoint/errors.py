"""The one exception type of the checkpoint package.

A `CheckpointError` means a checkpoint, a conversion's input or its output is unusable; the message
is one line that names the culprit (file, tensor, rank directory or flag) and what to change.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or conversion input/output) is unusable; the message names the culprit."""
