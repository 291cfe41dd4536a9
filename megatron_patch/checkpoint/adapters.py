"""LoRA checkpoints: the adapters alone, and the record of the base model they were trained on.

A LoRA run saves its adapters' tensors and those of the modules it trains fully (rank folders like any
checkpoint, placed by the weight mapping's `checkpoint_mappings`) and no copy of the frozen base. `checkpoint_info.json` says so:

    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", ...], "modules_to_save": [],
             "base": {"path": "/ckpts/idefics2-8b-tp8", "iteration": "release", "fingerprint": "3f9c..."}}

The fingerprint hashes the base iteration's `checkpoint_info.json`, its config and a sample of every
model file's bytes (the first and last MiB): cheap at 8B, and it changes when the weights do. A
resume finds the base at the recorded path (or `--lora-base`) and refuses, in one line, a base that
is missing or whose fingerprint differs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from megatron_patch.checkpoint.config_files import CONFIG_FILE, HF_CONFIG_DIR
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.info import INFO_FILE, CheckpointInfo
from megatron_patch.checkpoint.layout import Iteration, resolve_iteration

SAMPLE_BYTES = 1 << 20


def fingerprint(folder: Path) -> str:
    """sha256 over an iteration folder's info, config and the sampled bytes of each model file."""
    digest = hashlib.sha256()
    for path in [folder / INFO_FILE, folder / HF_CONFIG_DIR / CONFIG_FILE]:
        digest.update(path.read_bytes())
    for path in sorted(folder.glob("mp_rank_*/*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.parent.name}/{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(max(size - SAMPLE_BYTES, 0))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def base_record(base_dir, iteration: Optional[Iteration]) -> dict:
    """What a LoRA checkpoint records of the full checkpoint its run started from."""
    iteration, folder = resolve_iteration(base_dir, iteration)
    if CheckpointInfo.read(folder).lora is not None:
        raise CheckpointError(f"{folder} is a LoRA checkpoint; the base of a LoRA run must be a full checkpoint")
    return {"path": str(Path(base_dir).resolve()), "iteration": iteration, "fingerprint": fingerprint(folder)}


def lora_record(settings, base: dict) -> dict:
    """checkpoint_info.json's "lora" for adapters of `settings` (a LoraSettings) on `base`."""
    return {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "targets": list(settings.targets), "modules_to_save": list(settings.modules_to_save), "base": base}


def check_base(record: dict, checkpoint: Path, override: Optional[str] = None) -> tuple[str, Iteration]:
    """(base folder, iteration) a LoRA checkpoint's adapters belong on: the recorded base, or
    `override` (--lora-base); CheckpointError (one line) if it is missing or not the same weights."""
    base = record["base"]
    path = override or base["path"]
    where = "--lora-base" if override else f"the base recorded in {checkpoint}"
    try:
        _, folder = resolve_iteration(path, base["iteration"])
    except CheckpointError as err:
        raise CheckpointError(f"{where} ({path}) is missing: {err}; pass --lora-base with the base checkpoint "
                              f"the adapters were trained on") from None
    if fingerprint(folder) != base["fingerprint"]:
        raise CheckpointError(f"{where} ({folder}) differs from the base {checkpoint} was trained on "
                              f"(fingerprint {base['fingerprint'][:12]}...); pass --lora-base with that base")
    return path, base["iteration"]
