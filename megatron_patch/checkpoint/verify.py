"""Checks a converter makes before it publishes its output (and before the tracker may name it).

- `require_used_once`: every source tensor was read exactly once (none skipped, none read twice).
- `verify_rank_folders`: every rank folder the layout needs exists, holds exactly the tensors the
  weight mapping places there (no missing, no extra), each with the shape the mapping gives.
Errors name the tensor (and the rank folder).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Hashable, Iterable

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import rank_dir_name
from megatron_patch.checkpoint.model_files import RankReader
from megatron_patch.checkpoint.plan import rank_tensor_shapes
from megatron_patch.models.idefics2.weight_mapping import PipelineLayout


def require_used_once(uses: Counter, sources: Iterable[Hashable], describe: Callable[[Hashable], str]) -> None:
    """Raise CheckpointError for the first of `sources` that `uses` did not count exactly once;
    `describe(key)` names it (e.g. 'source tensor X' or 'tensor X of RANK_DIR')."""
    for key in sources:
        if uses[key] != 1:
            raise CheckpointError(f"{describe(key)} was used {uses[key]} times instead of once")


def verify_rank_folders(folder, hf_config, layout: PipelineLayout, tp_size: int, hf_shapes=None) -> int:
    """Raise CheckpointError on the first discrepancy; returns the number of tensors checked."""
    folder = Path(folder)
    expected = rank_tensor_shapes(hf_config, layout, tp_size, hf_shapes)
    checked = 0
    for (stage, tp_rank), shapes in sorted(expected.items()):
        reader = RankReader(folder / rank_dir_name(tp_rank, stage, layout.pipeline_size))
        present = set(reader.names())
        missing = sorted(set(shapes) - present)
        if missing:
            raise CheckpointError(f"{reader.rank_dir} lacks tensor {missing[0]} ({len(missing)} missing)")
        extra = sorted(present - set(shapes))
        if extra:
            raise CheckpointError(f"{reader.rank_dir} holds tensor {extra[0]}, which the mapping does not place there")
        for name, shape in shapes.items():
            found = reader.shape(name)
            if found != shape:
                raise CheckpointError(f"{reader.rank_dir}: tensor {name} has shape {found}, the mapping expects {shape}")
            checked += 1
    stray = sorted(
        p.name for p in folder.iterdir()
        if p.is_dir() and p.name.startswith("mp_rank_")
        and p.name not in {rank_dir_name(r, s, layout.pipeline_size) for s, r in expected}
    )
    if stray:
        raise CheckpointError(f"{folder / stray[0]} does not belong to a TP={tp_size} x PP={layout.pipeline_size} checkpoint")
    return checked
