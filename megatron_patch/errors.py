"""Errors a user can act on, and the one-line rule for their messages.

A `UserError` means the input is unusable (a flag, a checkpoint, the data) or the run had to stop
(too many NaN steps, a collective that timed out); its message is one line that names the culprit
(flag, file, tensor, shard or rank) and what to change. Each package subclasses it beside the code
that raises it (`ArgumentError`, `CheckpointError`, `DataQualityError`, `TrainingStopped`,
`CollectiveTimeout`), keeping a builtin base where callers catch one (`except ValueError`). The
entry point and the tools catch `UserError` and print `PROG: error: <message>` instead of a traceback.
"""
from __future__ import annotations


def one_line(message) -> str:
    """`message` with every run of white space (newlines of wrapped library errors too) as one space."""
    return " ".join(str(message).split())


class UserError(Exception):
    """An error the user can act on; its message is always one line."""

    def __init__(self, message):
        super().__init__(one_line(message))  # wrapped library errors may span lines; ours never do
