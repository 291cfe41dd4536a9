"""A LoRA checkpoint out to Hugging Face: its adapters as a peft folder, or merged into its base.

    tensors = adapter_tensors(source)           # {HF name: full tensor}, merged over the TP shards
    write_peft_adapter(folder, settings, tensors, base)     # --adapter-only (peft_adapter.py)
    merge = AdapterMerge(source)                # the merged export: base weights + scale * B @ A
    weight = merge(hf_name, base_weight)

A LoRA checkpoint's rank folders hold only adapters (checkpoint/adapters.py). They are small, so
they are merged into whole tensors at once; the base's tensors stream through the converter one
group at a time as for any checkpoint, each projection with an adapter merged as peft merges it
(`W + (B @ A) * alpha / rank`, in fp32, cast back to W's dtype).
"""
from __future__ import annotations

import torch

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.models.idefics2.lora import LoraSettings
from megatron_patch.models.idefics2.weight_mapping import adapter_base_weight


def adapter_tensors(source) -> dict:
    """{HF name: full tensor} of every adapter of a LoRA checkpoint (a ShardedCheckpoint of one)."""
    if source.info.lora is None:
        raise CheckpointError(f"{source.dir} is a full checkpoint, not a LoRA one: it holds no adapters")
    return {name: source.hf_tensor(name) for m in source.mappings for name in m.hf}


class AdapterMerge:
    """Base weight -> merged weight, for each base projection a LoRA checkpoint's adapters sit on."""

    def __init__(self, source):
        self.scale = LoraSettings.from_record(source.info.lora).scale
        tensors = adapter_tensors(source)
        self.pairs = {}
        for name in tensors:
            if ".lora_A." in name:
                self.pairs[adapter_base_weight(name)] = (tensors[name], tensors[name.replace(".lora_A.", ".lora_B.")])
        self.merged = set()

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.pairs:
            return weight
        a, b = self.pairs[name]
        self.merged.add(name)
        return (weight.float() + (b.float() @ a.float()) * self.scale).to(weight.dtype)

    def check_all_merged(self) -> None:
        missing = sorted(set(self.pairs) - self.merged)
        if missing:
            raise CheckpointError(f"the adapter of {missing[0]} found no such base weight ({len(missing)} unmerged)")
