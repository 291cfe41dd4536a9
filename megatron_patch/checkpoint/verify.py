"""What a checkpoint must hold, derived from the config through the one weight mapping, and the
check that a folder holds exactly that (a training save runs it before the tracker may name the folder;
so does a converter before it publishes).

HF tensor shapes come from `transformers`' own Idefics2 built on the meta device (no memory, and
the reference for what `from_pretrained` expects). Megatron shapes per rank are those shapes pushed
through `hf_to_mcore` on meta tensors: the same split rules the converters and the loader use.
`verify_rank_folders`: every rank folder the layout needs exists, holds exactly the tensors the
weight mapping places there (no missing, no extra), each with the shape the mapping gives; errors
name the tensor and the rank folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import rank_dir_name
from megatron_patch.checkpoint.model_files import RankReader
from megatron_patch.models.idefics2.config import tied_word_embeddings
from megatron_patch.models.idefics2.weight_mapping import (
    PipelineLayout,
    adapter_base_weight,
    adapter_mappings,
    checkpoint_mappings,
    hf_tensor_names,
    hf_to_mcore,
    saved_module_mappings,
)


def hf_tensor_shapes(hf_config, lora=None) -> dict[str, tuple]:
    """Every HF tensor name of the model (tied head counted once) -> shape; with `lora` (a LoRA
    checkpoint's record), of its adapters: A [rank, in] and B [out, rank] of each base projection."""
    from transformers import Idefics2ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(hf_config)
    state = model.state_dict()
    if lora is None:
        return {name: tuple(state[name].shape) for name in hf_tensor_names(hf_config)}
    shapes = {name: tuple(state[name].shape) for m in saved_module_mappings(hf_config, lora["modules_to_save"])
              for name in m.hf}
    for m in adapter_mappings(hf_config, lora["targets"]):
        out_features, in_features = state[adapter_base_weight(m.hf[0])].shape
        shapes[m.hf[0]] = (lora["rank"], in_features) if ".lora_A." in m.hf[0] else (out_features, lora["rank"])
    return shapes


def rank_tensor_shapes(hf_config, layout: PipelineLayout, tp_size: int, hf_shapes=None,
                       lora=None) -> dict[tuple, dict[str, tuple]]:
    """(pipeline stage, TP rank) -> {local canonical name: shape} for a checkpoint at this layout."""
    hf_shapes = hf_shapes or hf_tensor_shapes(hf_config, lora)
    tied = tied_word_embeddings(hf_config)
    out = {(s, r): {} for s in range(layout.pipeline_size) for r in range(tp_size)}
    targets, modules = (None, ()) if lora is None else (lora["targets"], lora["modules_to_save"])
    for m in checkpoint_mappings(hf_config, targets, modules):
        meta = [torch.empty(hf_shapes[name], device="meta") for name in m.hf]
        for stage, local in layout.placements(m, tied):
            for r in range(tp_size):
                out[(stage, r)][local] = tuple(hf_to_mcore(m, meta, r, tp_size).shape)
    return out


def verify_rank_folders(folder, hf_config, layout: PipelineLayout, tp_size: int, hf_shapes=None, lora=None) -> int:
    """Raise CheckpointError on the first discrepancy; returns the number of tensors checked. `lora`:
    the record of a LoRA checkpoint, which holds its adapters only."""
    folder = Path(folder)
    expected = rank_tensor_shapes(hf_config, layout, tp_size, hf_shapes, lora)
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
