"""What a checkpoint must hold, derived from the config through the one weight mapping.

HF tensor shapes come from `transformers`' own Idefics2 built on the meta device (no memory, and
the reference for what `from_pretrained` expects). Megatron shapes per rank are those shapes pushed
through `hf_to_mcore` on meta tensors: the same split rules the converters and the loader use.
"""
from __future__ import annotations

import torch

from megatron_patch.models.idefics2.config import tied_word_embeddings
from megatron_patch.models.idefics2.weight_mapping import PipelineLayout, hf_tensor_names, hf_to_mcore, tensor_mappings


def hf_tensor_shapes(hf_config) -> dict[str, tuple]:
    """Every HF tensor name of the model (tied head counted once) -> shape."""
    from transformers import Idefics2ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(hf_config)
    state = model.state_dict()
    return {name: tuple(state[name].shape) for name in hf_tensor_names(hf_config)}


def rank_tensor_shapes(hf_config, layout: PipelineLayout, tp_size: int, hf_shapes=None) -> dict[tuple, dict[str, tuple]]:
    """(pipeline stage, TP rank) -> {local canonical name: shape} for a checkpoint at this layout."""
    hf_shapes = hf_shapes or hf_tensor_shapes(hf_config)
    tied = tied_word_embeddings(hf_config)
    out = {(s, r): {} for s in range(layout.pipeline_size) for r in range(tp_size)}
    for m in tensor_mappings(hf_config):
        meta = [torch.empty(hf_shapes[name], device="meta") for name in m.hf]
        for stage, local in layout.placements(m, tied):
            for r in range(tp_size):
                out[(stage, r)][local] = tuple(hf_to_mcore(m, meta, r, tp_size).shape)
    return out


def mapping_groups(hf_config) -> list[list]:
    """Mappings grouped by the HF tensors they read, in mapping order: a tied head shares the
    embedding's group, so a converter reads each HF tensor exactly once."""
    groups: dict[tuple, list] = {}
    for m in tensor_mappings(hf_config):
        groups.setdefault(m.hf, []).append(m)
    return list(groups.values())
