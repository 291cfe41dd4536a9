"""A peft LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) of transformers'
Idefics2: read into the megatron-core adapters of `lora.py`, and written by the exporter.

    settings = read_adapter_settings(folder)              # validated before any model is built
    load_peft_adapter(model, folder, hf_config, opts)     # this rank's shards, after add_lora
    write_peft_adapter(folder, settings, tensors, base)   # full HF-named adapter tensors -> a peft folder

peft saves an adapter under the transformers module names without the adapter's name, e.g.
`base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight` ([rank, in]) and
`...lora_B.weight` ([out, rank]). Which modules carry adapters is read from those keys (the config's
`target_modules`, a list of names or a regex, only selected them); this slice accepts adapters on every
layer of the language model only, on one or more of q, k, v, o, gate, up and down projections.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron_patch.errors import UserError
from megatron_patch.models.idefics2.lora import DEFAULT_TARGETS, LoraSettings, adapters
from megatron_patch.models.idefics2.weight_mapping import LORA_PROJECTIONS

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.model\.text_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# peft options that change what the adapter computes (or what it trains), refused when set.
_UNSUPPORTED = [
    ("use_dora", lambda v: bool(v), "DoRA"), ("use_rslora", lambda v: bool(v), "rsLoRA (scale alpha / sqrt(r))"),
    ("bias", lambda v: v not in (None, "none"), "bias training"), ("lora_bias", lambda v: bool(v), "a bias on lora_B"),
    ("modules_to_save", lambda v: bool(v), "modules_to_save"),
    ("layers_to_transform", lambda v: v is not None, "layers_to_transform"),
    ("layers_pattern", lambda v: bool(v), "layers_pattern"),
    ("rank_pattern", lambda v: bool(v), "rank_pattern"), ("alpha_pattern", lambda v: bool(v), "alpha_pattern"),
    ("layer_replication", lambda v: bool(v), "layer_replication"),
    ("trainable_token_indices", lambda v: bool(v), "trainable_token_indices"),
    ("target_parameters", lambda v: bool(v), "target_parameters"),
    ("fan_in_fan_out", lambda v: bool(v), "fan_in_fan_out"),
    ("use_qalora", lambda v: bool(v), "QA-LoRA"), ("use_bdlora", lambda v: bool(v), "BD-LoRA"),
    ("alora_invocation_tokens", lambda v: bool(v), "activated LoRA"), ("arrow_config", lambda v: bool(v), "Arrow routing"),
    ("kasa_config", lambda v: bool(v), "KaSA"), ("monteclora_config", lambda v: bool(v), "MonteCLoRA"),
    ("velora_config", lambda v: bool(v), "VeLoRA"),
    ("init_lora_weights", lambda v: v not in (True, False, "gaussian"),
     "an init_lora_weights that changes the base model (PiSSA, OLoRA, LoftQ, CorDA, EVA)"),
]

# peft config fields that do not change what a loaded plain LoRA adapter computes (used, informational,
# or only read together with an option refused above).
HARMLESS_FIELDS = frozenset({
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "auto_mapping",
    "base_model_name_or_path", "inference_mode", "peft_version", "revision", "task_type", "megatron_config",
    "megatron_core", "ensure_weight_tying", "qalora_group_size", "corda_config", "eva_config", "loftq_config",
    "lora_ga_config",
})


class PeftAdapterError(UserError, ValueError):
    """A --lora-load folder this slice cannot use; one line naming the folder and the reason."""


def read_adapter_settings(folder) -> LoraSettings:
    """Rank, alpha, dropout and targets of a peft LoRA folder; PeftAdapterError for what is unsupported."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PeftAdapterError(f"--lora-load {folder}: no {path.name} (save the adapter with peft's save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PeftAdapterError(f"--lora-load {config_path} is not valid JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise PeftAdapterError(f"--lora-load {folder}: peft_type {config.get('peft_type')!r} is not supported; only LORA")
    for key, unsupported, what in _UNSUPPORTED:
        if unsupported(config.get(key)):
            raise PeftAdapterError(f"--lora-load {folder}: {what} ({key}={config.get(key)!r}) is not supported; "
                                   "use a plain LoRA adapter")
    targets = _targets_from_keys(folder, _keys(weights_path))
    return LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                        dropout=float(config.get("lora_dropout") or 0.0), targets=targets)


def _keys(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _targets_from_keys(folder: Path, keys) -> tuple:
    seen = {}
    for key in keys:
        match = _KEY.match(key)
        projection = match and match.group(3)
        if not match or LORA_PROJECTIONS.get(projection, ("",))[0] != f"{match.group(2)}.{projection}":
            raise PeftAdapterError(f"--lora-load {folder}: {key} is outside the language model's q/k/v/o/gate/up/down "
                                   "projections; adapters on other modules are not supported yet")
        seen.setdefault(projection, set()).add((int(match.group(1)), match.group(4)))
    if not seen:
        raise PeftAdapterError(f"--lora-load {folder}: {WEIGHTS} holds no LoRA weights")
    layers = {layer for entries in seen.values() for layer, _ in entries}
    want = {(layer, ab) for layer in range(max(layers) + 1) for ab in "AB"}
    for projection, entries in seen.items():
        if entries != want:
            raise PeftAdapterError(f"--lora-load {folder}: {projection} has adapters on some layers only; "
                                   "adapters on every language-model layer are supported")
    return tuple(n for n in DEFAULT_TARGETS if n in seen)


def check_layers(folder, num_layers: int) -> None:
    """The adapter covers exactly the model's language-model layers."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f:
        layers = {int(_KEY.match(k).group(1)) for k in f.keys()}
    if max(layers) + 1 != num_layers:
        raise PeftAdapterError(f"--lora-load {folder}: the adapter has {max(layers) + 1} language-model layers, "
                               f"the model {num_layers}; use an adapter trained on this base model")


def peft_key(layer: int, projection: str, ab: str) -> str:
    return f"{PEFT_PREFIX}model.text_model.layers.{layer}.{LORA_PROJECTIONS[projection][0]}.lora_{ab}.weight"


def target_modules(targets) -> str:
    """peft's `target_modules` selecting exactly these projections of the language model's layers (a
    regex: a list of names would also select the perceiver's and the connector's projections)."""
    by_module = {}
    for name in targets:
        module = LORA_PROJECTIONS[name][0].split(".")[0]
        by_module.setdefault(module, []).append(name)
    alternatives = "|".join(rf"{module}\.({'|'.join(names)})" for module, names in by_module.items())
    return rf".*text_model\.layers\.\d+\.({alternatives})"


def write_peft_adapter(folder, settings: LoraSettings, tensors: dict, base: str) -> None:
    """A peft folder from {HF name (`model.text_model.layers.0.self_attn.q_proj.lora_A.weight`): full
    tensor}; `base` goes into base_model_name_or_path. `PeftModel.from_pretrained` loads it."""
    from megatron_patch.checkpoint.layout import write_durable
    from megatron_patch.checkpoint.safetensors_io import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": target_modules(settings.targets), "bias": "none", "use_dora": False,
              "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None}
    write_safetensors(folder / WEIGHTS, {PEFT_PREFIX + name: t.contiguous() for name, t in tensors.items()},
                      metadata={"format": "pt"})
    write_durable(folder / CONFIG, json.dumps(config, indent=2) + "\n")


def load_peft_adapter(model, folder, settings: LoraSettings) -> None:
    """Copy this rank's shard of each adapter from the peft folder into `model` (built with add_lora)."""
    from megatron.core import parallel_state
    from safetensors import safe_open

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f, torch.no_grad():
        for layer, projection, adapter, _ in adapters(model):
            a, b = (f.get_tensor(peft_key(layer, projection, ab)) for ab in "AB")
            if adapter.linear_in.weight.shape[1] != a.shape[1]:  # row-parallel base: A split on its input
                a = a.chunk(tp_size, dim=1)[tp_rank]
            if adapter.linear_out.weight.shape[0] != b.shape[0]:  # column-parallel base: B split on its output
                b = b.chunk(tp_size, dim=0)[tp_rank]
            for param, value, ab in ((adapter.linear_in.weight, a, "A"), (adapter.linear_out.weight, b, "B")):
                if tuple(param.shape) != tuple(value.shape):
                    raise PeftAdapterError(f"--lora-load {folder}: {peft_key(layer, projection, ab)} has shape "
                                           f"{tuple(value.shape)}, this rank expects {tuple(param.shape)}")
                param.copy_(value)


def gather_adapter_tensors(model) -> dict:
    """{peft key: this rank's shard} of every adapter here (for tests and, later, export)."""
    out = {}
    for layer, projection, adapter, _ in adapters(model):
        for ab, param in (("A", adapter.linear_in.weight), ("B", adapter.linear_out.weight)):
            tensor = param.main_grad if getattr(param, "main_grad", None) is not None else param.grad
            out[peft_key(layer, projection, ab)] = (param.detach().cpu(), None if tensor is None else tensor.detach().cpu())
    return out
