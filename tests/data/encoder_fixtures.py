"""Shared helpers for the encoder tests: the real Mistral tokenizer folder, HF references, images.

Import explicitly (``from tests.data.encoder_fixtures import ...``); corpora.py holds the loader
tests' corpora and shards.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_patch.data.chat import IDEFICS2_CHAT_TEMPLATE
from megatron_patch.data.image_processing import ImageProcessingConfig
from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    """One Idefics2 tokenizer folder (real Mistral sentencepiece) per test session."""
    root = Path(tempfile.mkdtemp(prefix="idefics2_tok_"))
    atexit.register(shutil.rmtree, root, True)
    return build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), root / "tokenizer")


@functools.lru_cache(maxsize=None)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def hf_image_processor(config: ImageProcessingConfig):
    """transformers' Idefics2 image processor, PIL backend (the one that runs without torchvision,
    and whose resize is PIL's, like ours), with the same settings."""
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2ImageProcessorPil(**config.hf_kwargs())


def hf_processor(config: ImageProcessingConfig, image_seq_len: int = 64):
    """transformers' Idefics2Processor built offline from the image processor + our tokenizer."""
    from transformers import AutoTokenizer, Idefics2Processor

    return Idefics2Processor(hf_image_processor(config), AutoTokenizer.from_pretrained(tokenizer_dir()),
                             image_seq_len=image_seq_len, chat_template=IDEFICS2_CHAT_TEMPLATE)


def hf_parts(messages):
    """Canonical messages -> the multimodal form transformers' chat templates take."""
    from megatron_patch.data.chat import content_parts

    return [{"role": m["role"], "content": content_parts(m["content"])} for m in messages]


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Gradient + noise (so resizing has structure to get wrong), converted to ``mode``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([noisy, alpha], -1), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "P_transparent":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = 3
        return image
    return rgba if mode == "RGBA" else rgba.convert(mode)


def conversation(*turns, sample_id="s0") -> dict:
    """Canonical record from alternating (role, content) pairs."""
    return {"id": sample_id, "images": [], "messages": [{"role": r, "content": c} for r, c in turns]}
