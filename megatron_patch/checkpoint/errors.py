"""The one exception type of the checkpoint package, and the one-line rule for its messages.

A `CheckpointError` means a checkpoint, a conversion's input or its output is unusable; the message
is one line that names the culprit (file, tensor, rank directory or flag) and what to change.
"""
from __future__ import annotations


def one_line(message) -> str:
    """`message` with every run of white space (newlines of wrapped library errors too) as one space."""
    return " ".join(str(message).split())


class CheckpointError(ValueError):
    """A checkpoint (or conversion input/output) is unusable; the message names the culprit."""

    def __init__(self, message):
        super().__init__(one_line(message))  # wrapped library errors may span lines; ours never do
