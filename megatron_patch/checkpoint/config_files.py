"""The model configuration a checkpoint was built from: HF `config.json` plus tokenizer/processor files.

A Megatron iteration folder keeps them in `hf_config/`, so loading (training, mcore2hf) needs no
architecture flags, and converting back to HF restores the tokenizer and processor. "Side files" are
every top-level regular file of an HF folder except weights and `config.json` (the config is written
through `config.save_pretrained`, after it has been parsed and checked to be Idefics2).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_patch.checkpoint.errors import CheckpointError

HF_CONFIG_DIR = "hf_config"
CONFIG_FILE = "config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config_dict(folder, file_name: str = CONFIG_FILE) -> dict:
    """A JSON object file of an HF folder (config.json unless named), with one-line errors."""
    path = Path(folder) / file_name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_idefics2_config(folder):
    """The `Idefics2Config` in `folder/config.json`; a clear error when it is missing or another model."""
    from transformers import Idefics2Config

    data = read_config_dict(folder)
    model_type = data.get("model_type")
    if model_type != "idefics2":
        raise CheckpointError(
            f"{Path(folder) / CONFIG_FILE} is a {model_type!r} config, not Idefics2 (model_type 'idefics2')"
        )
    try:
        return Idefics2Config.from_pretrained(str(folder))
    except Exception as err:  # transformers raises several types for malformed configs
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE} is not a valid Idefics2 config: {err}") from None


def side_files(folder) -> list[Path]:
    """Tokenizer / processor / generation files of an HF folder: top-level files that are not weights."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name == CONFIG_FILE:
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES:
            continue
        out.append(path)
    return out


def write_config_dir(dst, hf_config, side_files_from: Optional[Path] = None) -> list[str]:
    """Write `config.json` and copy the side files of `side_files_from`; returns the copied names."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(dst))
    copied = []
    if side_files_from is not None:
        for path in side_files(side_files_from):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
