"""A converter reads every source tensor exactly once: in groups that share HF tensors, and counted.

- `mapping_groups`: the weight mappings grouped by the HF tensors they read (a tied head shares the
  embedding's group), so each HF tensor is read once however many mappings use it.
- `require_used_once`: every source tensor was read exactly once (none skipped, none read twice);
  the error names the tensor.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Iterable

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.models.idefics2.weight_mapping import tensor_mappings


def mapping_groups(hf_config) -> list[list]:
    """Mappings grouped by the HF tensors they read, in mapping order: a tied head shares the
    embedding's group, so a converter reads each HF tensor exactly once."""
    groups: dict[tuple, list] = {}
    for m in tensor_mappings(hf_config):
        groups.setdefault(m.hf, []).append(m)
    return list(groups.values())


def require_used_once(uses: Counter, sources: Iterable[Hashable], describe: Callable[[Hashable], str]) -> None:
    """Raise CheckpointError for the first of `sources` that `uses` did not count exactly once;
    `describe(key)` names it (e.g. 'source tensor X' or 'tensor X of RANK_DIR')."""
    for key in sources:
        if uses[key] != 1:
            raise CheckpointError(f"{describe(key)} was used {uses[key]} times instead of once")
