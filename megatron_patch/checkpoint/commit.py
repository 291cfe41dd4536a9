"""The commit protocol of an iteration folder: every rank writes its parts, rank 0 publishes.

    final = save_iteration("ckpts/run1", 2000, parts, keep_last=3)

All ranks call it together (it synchronises through torch.distributed when initialised):
1. rank 0 makes a fresh hidden staging folder (`.iter_0002000.partial`, layout.py);
2. every rank runs `part.save(staging)` for each part: its own files, no collectives (a rank that
   fails goes on to step 3 with its error, so no rank waits forever);
3. the first failure of any rank is raised on every rank (nothing is published);
4. rank 0 runs `part.finish(staging)` for each part (checks and files that need every rank's),
   fsyncs the tree, renames the folder into place (replacing an older save of the same iteration),
   points the tracker at it, and only then deletes iteration folders beyond `keep_last`.
A kill at any moment leaves the previous checkpoint loadable. A shared filesystem is assumed, as in
Megatron-LM. `BackgroundSave` runs step 2 on a thread from host copies of the parts, and steps 3-4
once every rank's thread is done (asked at a point every rank reaches: the training loop's saves).
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import (
    Iteration,
    commit,
    fsync_tree,
    iteration_dir_name,
    parse_iteration,
    prune_iterations,
    staging_path,
    write_tracker,
)


class CheckpointPart(Protocol):
    """One kind of state in an iteration folder (model weights, optimizer state, RNG, ...)."""

    def save(self, staging: Path) -> None:
        """Write this rank's files of the part into `staging` (no collectives)."""

    def finish(self, staging: Path) -> None:
        """Rank 0, once every rank's files are in `staging`: checks and whole-folder files."""


def world_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(error: Optional[str]) -> None:
    """Rank 0's outcome reaches every rank (a barrier that also carries a failure)."""
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)


def _gather_errors(error: Optional[str]) -> None:
    """Every rank's outcome reaches every rank; the first failure is raised everywhere."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise CheckpointError(failed[0])


def begin(ckpt_dir, iteration: Iteration) -> tuple[Path, Path, Path]:
    """(root, final folder, fresh staging folder), made by rank 0 (collective)."""
    iteration = parse_iteration(iteration)
    root = Path(ckpt_dir)
    final = root / iteration_dir_name(iteration)
    staging = staging_path(final)
    error = None
    if world_rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)  # left by a crashed save
            staging.mkdir()
        except OSError as err:
            error = f"cannot create {staging}: {err}"
    _agree(error)
    return root, final, staging


def write(writers: Sequence[Callable[[Path], None]], staging: Path) -> Optional[str]:
    """This rank's files (no collectives); the failure as one line, or None."""
    try:
        for writer in writers:
            writer(staging)
    except Exception as err:  # reported on every rank so no rank waits forever
        return f"rank {world_rank()} failed to write {staging}: {type(err).__name__}: {err}"
    return None


def publish(root: Path, final: Path, staging: Path, parts: Sequence[CheckpointPart], error: Optional[str],
            keep_last: Optional[int] = None) -> Path:
    """Every rank's write outcome agreed, then rank 0 finishes, commits, moves the tracker and prunes
    (collective)."""
    _gather_errors(error)
    error = None
    if world_rank() == 0:
        try:
            for part in parts:
                part.finish(staging)
            fsync_tree(staging)  # everything durable before the rename publishes it
            commit(staging, final, replace=True)
            write_tracker(root, parse_iteration(final.name))
        except Exception as err:
            error = f"saving {final} failed: {type(err).__name__}: {err}"
        if error is None and keep_last is not None:
            try:
                prune_iterations(root, keep_last)
            except Exception as err:
                error = f"{final} is saved, but deleting older checkpoints failed: {type(err).__name__}: {err}"
    _agree(error)
    return final


def save_iteration(ckpt_dir, iteration: Iteration, parts: Sequence[CheckpointPart],
                   keep_last: Optional[int] = None) -> Path:
    """Write `parts` as `ckpt_dir/iter_XXXXXXX` (or `release`) and publish it; returns the folder."""
    root, final, staging = begin(ckpt_dir, iteration)
    error = write([part.save for part in parts], staging)
    return publish(root, final, staging, parts, error, keep_last)


class BackgroundSave:
    """An asynchronous save: `writers` (each writing host copies taken before, no collectives) run on
    a thread while training goes on; `publish` (collective) commits once every rank has written.

        pending = BackgroundSave(ckpt_dir, iteration, writers, parts, keep_last)   # collective
        ...
        if pending.written_everywhere(device): pending.publish()                     # collective
    """

    def __init__(self, ckpt_dir, iteration: Iteration, writers: Sequence[Callable[[Path], None]],
                 parts: Sequence[CheckpointPart], keep_last: Optional[int] = None):
        self.root, self.final, self.staging = begin(ckpt_dir, iteration)
        self.parts, self.keep_last, self.error = parts, keep_last, None
        self._thread = threading.Thread(target=self._write, args=(writers,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, writers) -> None:
        self.error = write(writers, self.staging)

    def written_everywhere(self, device) -> bool:
        """Whether every rank's writer has finished (collective; the same answer on every rank)."""
        done = torch.tensor([0 if self._thread.is_alive() else 1], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done)

    def publish(self) -> Path:
        """Wait for this rank's writer, then publish as `save_iteration` does (collective)."""
        self._thread.join()
        return publish(self.root, self.final, self.staging, self.parts, self.error, self.keep_last)
