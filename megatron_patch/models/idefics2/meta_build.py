"""Build any (TP rank, pipeline stage) part of the real model on the meta device, in one process.

The layout planner needs every rank's part of an 8-billion-parameter model at TP 8 x PP 4 without
32 processes and without memory. megatron-core 0.16.1's layers take their TP size and rank from the
TP process group (`group.size()`, `group.rank()`, through `get_pg_size` once torch.distributed is up)
and the pipeline position from `parallel_state`. So a one-process world is started (the project's
`init_distributed`), and for the duration of one build `rank_view` swaps in stand-in TP and PP group
objects that answer size and rank only, plus megatron-core's own override hooks
(`set_tensor_model_parallel_world_size` / `_rank`, `set_pipeline_model_parallel_*`, which
Megatron-LM's checkpoint tools use for the same purpose). Nothing communicates while building without
initialisation (`init_weights=False`), so the stand-ins are never asked to. Everything is restored on
exit. The model itself is the project's `build_model`, so the shapes, the TP attributes megatron-core
sets (`tensor_model_parallel`, the KV-copy marks) and the stage contents are the real ones.
"""
from __future__ import annotations

import contextlib
import dataclasses

from megatron.core import parallel_state as ps

from megatron_patch.models.idefics2.config import ParallelOptions


class _SizeRankGroup:
    """Answers `size()` and `rank()` like a process group of `size` ranks seen from `rank`."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


_SETTERS = (
    ("_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", ps.set_tensor_model_parallel_world_size),
    ("_MPU_TENSOR_MODEL_PARALLEL_RANK", ps.set_tensor_model_parallel_rank),
    ("_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE", ps.set_pipeline_model_parallel_world_size),
    ("_MPU_PIPELINE_MODEL_PARALLEL_RANK", ps.set_pipeline_model_parallel_rank),
)


@contextlib.contextmanager
def rank_view(tp: int, pp: int, tp_rank: int, stage: int):
    """megatron-core sees this process as TP rank `tp_rank` of `tp`, pipeline stage `stage` of `pp`."""
    if not ps.model_parallel_is_initialized():
        from megatron_patch.platform import init_distributed

        init_distributed(1, 1)
    saved_groups = ps._TENSOR_MODEL_PARALLEL_GROUP, ps._PIPELINE_MODEL_PARALLEL_GROUP
    saved = [getattr(ps, name) for name, _ in _SETTERS]
    try:
        ps._TENSOR_MODEL_PARALLEL_GROUP = _SizeRankGroup(tp, tp_rank)
        ps._PIPELINE_MODEL_PARALLEL_GROUP = _SizeRankGroup(pp, stage)
        for (_, setter), value in zip(_SETTERS, (tp, tp_rank, pp, stage)):
            setter(value)
        yield
    finally:
        ps._TENSOR_MODEL_PARALLEL_GROUP, ps._PIPELINE_MODEL_PARALLEL_GROUP = saved_groups
        for (_, setter), value in zip(_SETTERS, saved):
            setter(value)


def meta_options(opts: ParallelOptions) -> ParallelOptions:
    """`opts` for a shapes-only build: parameters created through torch's default device (meta), not
    placed on a GPU by megatron-core; no fusions (they would try to compile nothing)."""
    return dataclasses.replace(opts, use_cpu_initialization=True, bias_fusions=False)


def build_rank_on_meta(hf_config, opts: ParallelOptions, tp_rank: int, stage: int):
    """The model part of (TP rank, stage) under layout `opts`, every parameter on the meta device.

    Call per-rank attribute queries (`param_is_not_tensor_parallel_duplicate`, ...) inside
    `rank_view` of the same rank: they read the TP rank from the parallel state."""
    from megatron_patch.models.idefics2.model import build_model

    with rank_view(opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, tp_rank, stage):
        return build_model(hf_config, meta_options(opts), init_weights=False, device="meta")
