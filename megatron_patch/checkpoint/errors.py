"""The one exception type of the checkpoint package.

A `CheckpointError` means a checkpoint, a conversion's input or its output is unusable; the message
is one line (`megatron_patch.errors.UserError`) that names the culprit (file, tensor, rank directory
or flag) and what to change.
"""
from __future__ import annotations

from megatron_patch.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint (or conversion input/output) is unusable; the message names the culprit."""
