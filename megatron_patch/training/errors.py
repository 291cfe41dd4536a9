"""Errors a user can act on (bad checkpoint, data or resume flags, a NaN stop): reported in one line.

The entry point catches `USER_ERRORS` and prints `PROG: error: <message>` instead of a traceback on
every rank. Errors every rank raises alike are printed by rank 0 only; data errors, which one DP
rank meets alone, by the rank that met them (torchrun then stops the others).
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_patch.checkpoint import CheckpointError
from megatron_patch.data.errors import DataQualityError
from megatron_patch.training.arguments import ArgumentError


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many consecutive NaN/Inf steps); the last checkpoint is intact."""


USER_ERRORS = (ArgumentError, CheckpointError, DataQualityError, TrainingStopped)


def report_error(prog: str, err: Exception) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or isinstance(err, DataQualityError):
        where = f"[rank {rank}] " if rank else ""
        print(f"{prog}: error: {where}{' '.join(str(err).split())}", file=sys.stderr, flush=True)
