"""Shared inputs of the training tests: a tiny trainable Idefics2 (real Mistral tokenizer) converted
to Megatron layout, and webdataset shards built by our tool from generated images.

`training_inputs()` builds them once per test session (cached on disk under one temp folder).
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SEQ_LENGTH = 64


def _records(root: Path, name: str, n: int, text_only_every: int = 2, seed: int = 0) -> Path:
    """LLaVA records: answers of very different lengths; every `text_only_every`-th has no image."""
    rng = np.random.default_rng(seed)
    images = root / f"{name}_images"
    images.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"]
    records = []
    for i in range(n):
        colour = colours[i % 4]
        answer = " ".join([f"a {colour} square"] * int(rng.integers(1, 6)))
        record = {"id": f"{name}-{i}", "conversations": [
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": answer}]}
        if i % text_only_every:
            size = (int(rng.integers(20, 57)), int(rng.integers(20, 57)))
            pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            pixels[..., "rgb".find(colour[0]) if colour[0] in "rgb" else 0] = 200
            Image.fromarray(pixels).save(images / f"{i}.png")
            record["image"] = f"{i}.png"
            record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
        records.append(record)
    path = root / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def _shards(root: Path, name: str, n: int, **kw) -> Path:
    from toolkits.pretrain_data_preprocessing import build_webdataset

    records = _records(root, name, n, **kw)
    out = root / f"{name}_shards"
    build_webdataset.main(["--input", str(records), "--image-folder", str(root / f"{name}_images"),
                           "--output-dir", str(out), "--samples-per-shard", "16", "--workers", "1", "--no-progress"])
    return out


@functools.lru_cache(maxsize=None)
def training_inputs() -> dict:
    """{"hf": HF folder, "mg": Megatron folder (release, TP1 x PP1), "train": shards, "valid": shards}."""
    root = Path(tempfile.mkdtemp(prefix="idefics2_train_"))
    atexit.register(shutil.rmtree, root, True)
    from toolkits.model_checkpoints_convertor.idefics2 import hf2mcore, make_tiny_checkpoint

    hf, mg = root / "hf", root / "mg"
    make_tiny_checkpoint.main(["--save-path", str(hf), "--tokenizer", "mistral"])
    hf2mcore.main(["--load-path", str(hf), "--save-path", str(mg), "--target-tensor-model-parallel-size", "1",
                   "--target-pipeline-model-parallel-size", "1"])
    return {"root": root, "hf": hf, "mg": mg, "train": _shards(root, "train", 48), "valid": _shards(root, "valid", 10, seed=1)}


def train_flags(inputs: dict, save: Path, *, tp=1, pp=1, iters=4, mbs=1, gbs=4, extra=()) -> list[str]:
    """The entry point's flags for a short fp32 run on the tiny model."""
    return [
        "--load", str(inputs["mg"]), "--data-path", str(inputs["train"]), "--save", str(save),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--seq-length", str(SEQ_LENGTH),
        "--train-iters", str(iters), "--lr", "1e-3", "--lr-warmup-iters", "1", "--min-lr", "1e-4",
        "--lr-decay-style", "cosine", "--weight-decay", "0.01", "--clip-grad", "1.0", "--log-interval", "1",
        "--num-workers", "0", "--seed", "7", *extra,
    ]
