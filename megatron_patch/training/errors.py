"""The training run's own user errors (a NaN stop, a collective that timed out) and how the entry
point reports any `UserError` in one line.

The entry point catches `megatron_patch.errors.UserError` and prints `PROG: error: <message>` instead
of a traceback on every rank. Errors every rank raises alike are printed by rank 0 only; data errors,
which one DP rank meets alone, and timeouts by the rank that met them (torchrun then stops the others).
"""
from __future__ import annotations

import re
import sys
from typing import Optional

import torch.distributed as dist

from megatron_patch.data.errors import DataQualityError
from megatron_patch.errors import UserError, one_line


class TrainingStopped(UserError, RuntimeError):
    """Training cannot go on (too many consecutive NaN/Inf steps); the last checkpoint is intact."""


class CollectiveTimeout(UserError, RuntimeError):
    """A collective or the start-up rendezvous waited --distributed-timeout-minutes for a peer."""


_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def as_collective_timeout(err: BaseException, minutes: int) -> Optional[CollectiveTimeout]:
    """`err` restated in one line when it is a distributed timeout (torch.distributed's DistError
    family, or gloo's and NCCL's RuntimeErrors), else None."""
    text = one_line(err)
    distributed = isinstance(err, dist.DistError) or re.search(r"gloo|nccl", text, re.IGNORECASE)
    if not (isinstance(err, RuntimeError) and distributed and _TIMEOUT.search(text)):
        return None
    return CollectiveTimeout(
        f"a collective or the rendezvous timed out after --distributed-timeout-minutes {minutes}: a peer rank "
        f"failed, was killed or stalls (see the other ranks' logs); raise --distributed-timeout-minutes if a step "
        f"or a save legitimately takes longer ({type(err).__name__}: {text[:200]})")


def report_error(prog: str, err: UserError) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or isinstance(err, (DataQualityError, CollectiveTimeout)):  # met by some ranks alone
        where = f"[rank {rank}] " if rank else ""
        print(f"{prog}: error: {where}{err}", file=sys.stderr, flush=True)
