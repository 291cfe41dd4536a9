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
