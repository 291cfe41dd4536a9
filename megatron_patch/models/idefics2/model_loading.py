"""Fill this rank's model part from HF tensors (and read it back) through the one weight mapping."""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_patch.models.idefics2.config import ParallelOptions, tied_word_embeddings
from megatron_patch.models.idefics2.layer_specs import canonical_to_module_name, module_to_canonical_name
from megatron_patch.models.idefics2.weight_mapping import (
    PipelineLayout,
    LORA_PREFIX,
    TensorMapping,
    hf_to_mcore,
    mcore_to_hf,
    tensor_mappings,
)


def pipeline_layout(hf_config, opts: ParallelOptions) -> PipelineLayout:
    return PipelineLayout(
        hf_config.text_config.num_hidden_layers,
        opts.pipeline_model_parallel_size,
        opts.decoder_first_pipeline_num_layers,
    )


def stage_mappings(hf_config, opts: ParallelOptions, stage: int, mappings=None) -> dict[str, TensorMapping]:
    """Local canonical name -> mapping, for the tensors pipeline stage `stage` holds (of `mappings`:
    the whole model's by default)."""
    layout = pipeline_layout(hf_config, opts)
    tied = tied_word_embeddings(hf_config)
    out = {}
    for m in tensor_mappings(hf_config) if mappings is None else mappings:
        for s, local in layout.placements(m, tied):
            if s == stage:
                out[local] = m
    return out


def is_adapter_parameter(name: str) -> bool:
    """A LoRA adapter's tensor (models/idefics2/lora.py), not a base weight."""
    return any(part.startswith(LORA_PREFIX) for part in name.split("."))


def load_hf_weights(model, get_hf_tensor: Callable[[str], torch.Tensor], hf_config, opts: ParallelOptions,
                    mappings=None) -> None:
    """Copy HF tensors into `model` (this rank's part), each model tensor at most once. Without
    `mappings` (the whole model's), every base weight must be filled; with a LoRA checkpoint's
    (`checkpoint_mappings`: its adapters and the modules it trained fully), every adapter."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    holds_adapters = mappings is not None and any(is_adapter_parameter(m.mcore) for m in mappings)
    required = {k for k in params if is_adapter_parameter(k) == holds_adapters}
    filled = set()
    with torch.no_grad():
        for local, m in stage_mappings(hf_config, opts, stage, mappings).items():
            name = canonical_to_module_name(local, opts.uses_transformer_engine())
            if name not in params:
                raise KeyError(f"model has no parameter {name} (mapped from {', '.join(m.hf)})")
            shard = hf_to_mcore(m, [get_hf_tensor(h) for h in m.hf], tp_rank, tp_size)
            if tuple(shard.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"shape mismatch for {name}: mapped {tuple(shard.shape)} from {', '.join(m.hf)}, "
                    f"model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(shard)
            filled.add(name)
    missing = sorted(required - filled)
    if missing:
        raise KeyError(f"{len(missing)} model tensor(s) have no HF source, first: {missing[0]}")


def local_tensors(model, opts: ParallelOptions, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's tensors (or their gradients) under canonical local names, detached on CPU."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param
        if tensor is None:
            tensor = getattr(param, "main_grad", None) if grads else None
        if tensor is not None:
            out[module_to_canonical_name(name, opts.uses_transformer_engine())] = tensor.detach().cpu()
    return out


def assemble_hf_tensors(
    shards: dict[tuple[int, int, str], torch.Tensor],
    hf_config,
    layout: PipelineLayout,
    tp_size: int,
    sum_tied: bool = False,
    mappings=None,
) -> dict[str, torch.Tensor]:
    """Full HF tensors from megatron shards keyed (pipeline stage, TP rank, local canonical name).

    A tied head is held on the first and the last stage: for weights the copies are equal and the
    first is kept; for gradients pass `sum_tied=True`, since the true gradient is their sum.
    `mappings`: the tensors to assemble (default: the whole model's).
    """
    tied = tied_word_embeddings(hf_config)
    out: dict[str, torch.Tensor] = {}
    for m in tensor_mappings(hf_config) if mappings is None else mappings:
        for stage, local in layout.placements(m, tied):
            missing = [r for r in range(tp_size) if (stage, r, local) not in shards]
            if missing:
                raise KeyError(f"megatron tensor {local} of pipeline stage {stage} is missing on TP rank {missing[0]}")
            parts = [shards[(stage, r, local)] for r in range(tp_size)]
            for name, tensor in zip(m.hf, mcore_to_hf(m, parts)):
                if name not in out:
                    out[name] = tensor
                elif sum_tied:
                    out[name] = out[name] + tensor
    return out


def unwrap(model):
    """The model part inside megatron-core wrappers (DDP, Float16Module), whose names are canonical."""
    while hasattr(model, "module"):
        model = model.module
    return model
