"""Freezing components: `--freeze-llm`, `--freeze-clip-vision-tower`, `--freeze-perceiver`.

`freeze` sets `requires_grad=False` before DDP and the optimizer are built, so neither sees the
frozen parameters: they get no gradient buffer, no optimizer state, and stay bit-identical.
"""
from __future__ import annotations

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


def freeze_base_for_lora(model) -> None:
    """With LoRA every base weight (vision tower, connector, language model) is frozen, as peft does;
    only the adapters (models/idefics2/lora.py) train."""
    from megatron_patch.models.idefics2.model_loading import is_adapter_parameter

    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


def _counted_once(param) -> bool:
    """Whether this rank counts `param` in model-wide totals: TP-replicated tensors on TP rank 0
    only, a replicated perceiver KV head on its first copy's rank only (`kv_replication.mark_copy`),
    the tied head's copy on the last stage not at all."""
    return tensor_parallel.param_is_not_tensor_parallel_duplicate(param) and not getattr(param, "shared", False)


def parameter_table(model, device) -> dict:
    """{component: (trainable, frozen)} element counts over the whole model (all TP and PP ranks).

    Collective over the model-parallel group (DP replicas hold the same parts)."""
    counts = torch.zeros(len(COMPONENTS), 2, dtype=torch.float64, device=device)
    for i, component in enumerate(COMPONENTS):
        for _, param in component_parameters(model, component):
            if _counted_once(param):
                counts[i, 0 if param.requires_grad else 1] += param.numel()
    if dist.is_initialized():
        dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return {c: (int(counts[i, 0]), int(counts[i, 1])) for i, c in enumerate(COMPONENTS)}


def format_parameter_table(table: dict, label: str = "trainable") -> str:
    """The start-up table of trainable vs frozen parameters per component (with LoRA, `label` is
    "LoRA adapters": the only parameters that train)."""
    names = {"vision": "vision tower", "connector": "connector (projection + perceiver)", "llm": "language model"}
    lines = [f"{'component':<36}{label:>14}{'frozen':>14}"]
    for component, (trainable, frozen) in table.items():
        lines.append(f"{names[component]:<36}{trainable:>14,}{frozen:>14,}")
    trainable = sum(t for t, _ in table.values())
    frozen = sum(f for _, f in table.values())
    lines.append(f"{'total':<36}{trainable:>14,}{frozen:>14,}")
    return "\n".join(lines)
