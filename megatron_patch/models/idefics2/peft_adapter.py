"""A peft LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) of transformers'
Idefics2: read into the megatron-core adapters of `lora.py`, and written by the exporter.

    settings = read_adapter_settings(folder, hf_config)            # validated before any model is built
    load_peft_adapter(model, folder, settings, hf_config, opts)    # this rank's shards, after add_lora
    write_peft_adapter(folder, settings, tensors, base)            # full HF-named tensors -> a peft folder

peft saves an adapter under the transformers module names without the adapter's name, e.g.
`base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight` ([rank, in]) and
`...lora_B.weight` ([out, rank]): the HF names of the weight mapping's `adapter_mappings` behind
`base_model.model.`. Which projections carry adapters is read from those keys (the config's
`target_modules`, a list of names or a regex, only selected them): any of LORA_PROJECTIONS (language
model, vision tower, perceiver, modality projection), each on every layer of its component. The
modules of `modules_to_save` (LORA_MODULES_TO_SAVE) are saved whole, under `base_model.model.` and
their HF names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_patch.errors import UserError
from megatron_patch.models.idefics2.lora import LoraSettings
from megatron_patch.models.idefics2.weight_mapping import (
    ALL_LORA_TARGETS,
    LORA_COMPONENTS,
    LORA_MODULES_TO_SAVE,
    LORA_PROJECTIONS,
    adapter_mappings,
    checkpoint_mappings,
    saved_module_mappings,
    split_lora_target,
    targets_inside,
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft options that change what the adapter computes (or what it trains), refused when set.
_UNSUPPORTED = [
    ("use_dora", lambda v: bool(v), "DoRA"), ("use_rslora", lambda v: bool(v), "rsLoRA (scale alpha / sqrt(r))"),
    ("bias", lambda v: v not in (None, "none"), "bias training"), ("lora_bias", lambda v: bool(v), "a bias on lora_B"),
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
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "exclude_modules", "auto_mapping",
    "base_model_name_or_path", "inference_mode", "peft_version", "revision", "task_type", "megatron_config",
    "megatron_core", "ensure_weight_tying", "qalora_group_size", "corda_config", "eva_config", "loftq_config",
    "lora_ga_config",
})


class PeftAdapterError(UserError, ValueError):
    """A --lora-load folder this slice cannot use; one line naming the folder and the reason."""


def read_adapter_settings(folder, hf_config, flag: str = "--lora-load") -> LoraSettings:
    """Rank, alpha, dropout and targets of a peft LoRA folder made on the Idefics2 of `hf_config`;
    PeftAdapterError (one line, naming `flag`) for what is unsupported or does not fit the model."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PeftAdapterError(f"{flag} {folder}: no {path.name} (save the adapter with peft's save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PeftAdapterError(f"{flag} {config_path} is not valid JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise PeftAdapterError(f"{flag} {folder}: peft_type {config.get('peft_type')!r} is not supported; only LORA")
    for key, unsupported, what in _UNSUPPORTED:
        if unsupported(config.get(key)):
            raise PeftAdapterError(f"{flag} {folder}: {what} ({key}={config.get(key)!r}) is not supported; "
                                   "use a plain LoRA adapter")
    where = f"{flag} {folder}"
    modules = tuple(config.get("modules_to_save") or ())
    unknown = [m for m in modules if m not in LORA_MODULES_TO_SAVE]
    if unknown:
        raise PeftAdapterError(f"{where}: modules_to_save {unknown[0]!r} is not supported; choose among "
                               f"{', '.join(LORA_MODULES_TO_SAVE)}")
    keys = _keys(weights_path)
    saved = {PEFT_PREFIX + name for m in saved_module_mappings(hf_config, modules) for name in m.hf}
    missing = sorted(saved - set(keys))
    if missing:
        raise PeftAdapterError(f"{where}: modules_to_save {list(modules)} but {WEIGHTS} lacks {missing[0]}")
    targets = _targets_from_keys(where, [k for k in keys if k not in saved], hf_config)
    inside = targets_inside(modules, targets)
    if inside:
        raise PeftAdapterError(f"{where}: the target {inside[0]} lies inside modules_to_save {list(modules)}; "
                               "use an adapter whose targets are outside the modules it trains fully")
    return LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                        dropout=float(config.get("lora_dropout") or 0.0), targets=targets, modules_to_save=modules)


def _keys(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _targets_from_keys(where: str, keys, hf_config) -> tuple:
    """The targets whose A and B are in `keys` on every layer of their component; anything else refused."""
    names = {t: [PEFT_PREFIX + m.hf[0] for m in adapter_mappings(hf_config, (t,))] for t in ALL_LORA_TARGETS}
    known = {name: target for target, target_names in names.items() for name in target_names}
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise PeftAdapterError(f"{where}: {unknown[0]} is not a LoRA A or B of a supported projection of this model "
                               f"(an adapter on other modules, or on a model with other layers)")
    present = {known[k] for k in keys}
    if not present:
        raise PeftAdapterError(f"{where}: {WEIGHTS} holds no LoRA weights")
    chosen = tuple(t for t in ALL_LORA_TARGETS if t in present)
    for target in chosen:
        missing = [n for n in names[target] if n not in keys]
        if missing:
            raise PeftAdapterError(f"{where}: {target} has adapters on some layers only (no "
                                   f"{missing[0][len(PEFT_PREFIX):]}); use an adapter of every layer, trained on this base model")
    return chosen


def load_peft_adapter(model, folder, settings: LoraSettings, hf_config, opts) -> None:
    """Copy this rank's shard of each adapter, and of each module it trains fully, from the peft folder
    into `model` (built with add_lora)."""
    from safetensors import safe_open

    from megatron_patch.models.idefics2.model_loading import load_hf_weights

    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f:
        load_hf_weights(model, lambda name: f.get_tensor(PEFT_PREFIX + name), hf_config, opts,
                        checkpoint_mappings(hf_config, settings.targets, settings.modules_to_save))


def target_modules(targets) -> str:
    """peft's `target_modules` selecting exactly these projections (a regex over module names: a list
    of names would select a q_proj in every component at once)."""
    paths = []
    for target in targets:
        component, projection = split_lora_target(target)
        module = LORA_PROJECTIONS[(component, projection)][0]
        hf_prefix = LORA_COMPONENTS[component][1]
        paths.append(re.escape(hf_prefix + module).replace(re.escape("{i}"), r"\d+"))
    return rf".*\b({'|'.join(paths)})"


def write_peft_adapter(folder, settings: LoraSettings, tensors: dict, base: str) -> None:
    """A peft folder from {HF name (`model.text_model.layers.0.self_attn.q_proj.lora_A.weight`, and the
    tensors of the modules to save): full tensor}; `base` goes into base_model_name_or_path.
    `PeftModel.from_pretrained` loads it."""
    from megatron_patch.checkpoint.layout import write_durable
    from megatron_patch.checkpoint.safetensors_io import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": target_modules(settings.targets), "bias": "none", "use_dora": False,
              "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True,
              "modules_to_save": list(settings.modules_to_save) or None}
    write_safetensors(folder / WEIGHTS, {PEFT_PREFIX + name: t.contiguous() for name, t in tensors.items()},
                      metadata={"format": "pt"})
    write_durable(folder / CONFIG, json.dumps(config, indent=2) + "\n")
