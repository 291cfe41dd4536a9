"""Freezing components: `--freeze-llm`, `--freeze-clip-vision-tower`, `--freeze-perceiver`.

`freeze` sets `requires_grad=False` before DDP and the optimizer are built, so neither sees the
frozen parameters: they get no gradient buffer, no optimizer state, and stay bit-identical.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

COMPONENTS = ("vision", "connector", "llm")
# Attribute of Idefics2Model holding each component (the LLM: embedding, decoder and head).
_MODULES = {"vision": "vision_model", "connector": "connector", "llm": "language_model"}


def component_parameters(model, component: str):
    """(name, parameter) of one component on this rank (none when the stage does not hold it)."""
    module = getattr(model, _MODULES[component], None)
    return [] if module is None else list(module.named_parameters())


def freeze(model, frozen) -> None:
    """Mark the parameters of every component in `frozen` as not trainable."""
    for component in frozen:
        for _, param in component_parameters(model, component):
            param.requires_grad_(False)


def freeze_base_for_lora(model, settings, hf_config, opts) -> None:
    """With LoRA every base weight (vision tower, connector, language model) is frozen, as peft does,
    but those of the modules `settings.modules_to_save` names; the adapters (models/idefics2/lora.py)
    train."""
    from megatron.core import parallel_state

    from megatron_patch.models.idefics2.layer_specs import canonical_to_module_name
    from megatron_patch.models.idefics2.model_loading import is_adapter_parameter, stage_mappings
    from megatron_patch.models.idefics2.weight_mapping import saved_module_mappings

    stage = parallel_state.get_pipeline_model_parallel_rank()
    saved = stage_mappings(hf_config, opts, stage, saved_module_mappings(hf_config, settings.modules_to_save))
    trained = {canonical_to_module_name(local, opts.uses_transformer_engine()) for local in saved}
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name) or name in trained)


def _counted_once(param) -> bool:
    """Whether this rank counts `param` in model-wide totals: TP-replicated tensors on TP rank 0
    only, a replicated perceiver KV head on its first copy's rank only (`kv_replication.mark_copy`),
    the tied head's copy on the last stage not at all."""
    return tensor_parallel.param_is_not_tensor_parallel_duplicate(param) and not getattr(param, "shared", False)


class Counts(NamedTuple):
    """Parameter elements of one component."""

    trained: int  # base weights that train (all of them, or what freezing / --lora-modules-to-save leaves)
    frozen: int
    adapters: int = 0  # LoRA adapters


def parameter_table(model, device) -> dict:
    """{component: Counts} element counts over the whole model (all TP and PP ranks).

    Collective over the model-parallel group (DP replicas hold the same parts)."""
    from megatron_patch.models.idefics2.model_loading import is_adapter_parameter

    counts = torch.zeros(len(COMPONENTS), 3, dtype=torch.float64, device=device)
    for i, component in enumerate(COMPONENTS):
        for name, param in component_parameters(model, component):
            if _counted_once(param):
                counts[i, 2 if is_adapter_parameter(name) else 0 if param.requires_grad else 1] += param.numel()
    if dist.is_initialized():
        dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return {c: Counts(*(int(x) for x in counts[i])) for i, c in enumerate(COMPONENTS)}


def format_parameter_table(table: dict) -> str:
    """The start-up table of trained vs frozen parameters per component (with LoRA adapters, their
    column first: a LoRA run trains them and what --lora-modules-to-save names)."""
    names = {"vision": "vision tower", "connector": "connector (projection + perceiver)", "llm": "language model"}
    table = {component: Counts(*counts) for component, counts in table.items()}
    columns = ["LoRA adapters", "trained", "frozen"] if any(c.adapters for c in table.values()) else ["trainable", "frozen"]
    fields = {"LoRA adapters": "adapters", "trained": "trained", "trainable": "trained", "frozen": "frozen"}
    lines = [f"{'component':<36}" + "".join(f"{c:>15}" for c in columns)]
    rows = list(table.items()) + [("total", Counts(*(sum(c[i] for c in table.values()) for i in range(3))))]
    for component, counts in rows:
        lines.append(f"{names.get(component, component):<36}" + "".join(f"{getattr(counts, fields[c]):>15,}" for c in columns))
    return "\n".join(lines)
