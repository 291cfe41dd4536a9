"""A LoRA checkpoint out to Hugging Face: its adapters as a peft folder, or merged into its base (the
one merge, also of a peft folder into an HF model: generate_and_score --adapter).

    tensors = adapter_tensors(source)           # {HF name: full tensor}, merged over the TP shards
    write_peft_adapter(folder, settings, tensors, base)     # --adapter-only (peft_adapter.py)
    merge = AdapterMerge.of_checkpoint(source)  # the merged export (or AdapterMerge.of_peft_folder)
    weight = merge(hf_name, base_weight)

A LoRA checkpoint's rank folders hold only adapters (checkpoint/adapters.py). They are small, so
they are merged into whole tensors at once; the base's tensors stream through the converter one
group at a time as for any checkpoint, each projection with an adapter merged as peft merges it
(`W + (B @ A) * alpha / rank`, in fp32, cast back to W's dtype).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.models.idefics2.lora import LoraSettings
from megatron_patch.models.idefics2.peft_adapter import PEFT_PREFIX, WEIGHTS
from megatron_patch.models.idefics2.weight_mapping import adapter_base_weight


def adapter_tensors(source) -> dict:
    """{HF name: full tensor} of every adapter and module to save of a LoRA checkpoint (a
    ShardedCheckpoint of one)."""
    if source.info.lora is None:
        raise CheckpointError(f"{source.dir} is a full checkpoint, not a LoRA one: it holds no adapters")
    return {name: source.hf_tensor(name) for m in source.mappings for name in m.hf}


class AdapterMerge:
    """Base weight -> merged weight: with its adapter merged in, or the trained value of a module to
    save; `tensors` are the adapters' full A and B and the modules' tensors by HF name, `scale`
    alpha / rank."""

    def __init__(self, scale: float, tensors: dict, source: str):
        self.scale, self.source = scale, source
        self.pairs, self.replaced = {}, {}  # base weight -> (A, B); a module to save's weight -> its trained value
        for name in tensors:
            if ".lora_A." in name:
                self.pairs[adapter_base_weight(name)] = (tensors[name], tensors[name.replace(".lora_A.", ".lora_B.")])
            elif ".lora_B." not in name:
                self.replaced[name] = tensors[name]
        self.merged = set()

    @classmethod
    def of_checkpoint(cls, source) -> "AdapterMerge":
        """The adapters of a LoRA checkpoint (a ShardedCheckpoint of one)."""
        scale = LoraSettings.from_record(source.info.lora).scale
        return cls(scale, adapter_tensors(source), str(source.dir))

    @classmethod
    def of_peft_folder(cls, folder, settings: LoraSettings) -> "AdapterMerge":
        """The adapters of a peft folder (read_adapter_settings checked it)."""
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / WEIGHTS))
        return cls(settings.scale, {name[len(PEFT_PREFIX):]: t for name, t in tensors.items()}, str(folder))

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.replaced:
            self.merged.add(name)
            return self.replaced[name].to(weight.device, weight.dtype)
        if name not in self.pairs:
            return weight
        a, b = self.pairs[name]
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CheckpointError(f"{self.source}: the adapter of {name} is {b.shape[0]} x {a.shape[1]}, the base's "
                                  f"weight {tuple(weight.shape)}; use an adapter trained on this base")
        self.merged.add(name)
        return (weight.float() + (b.float() @ a.float()).to(weight.device) * self.scale).to(weight.dtype)

    def check_all_merged(self) -> None:
        missing = sorted((set(self.pairs) | set(self.replaced)) - self.merged)
        if missing:
            raise CheckpointError(f"{self.source}: the adapter of {missing[0]} found no such base weight "
                                  f"({len(missing)} unmerged)")
