"""One canonical record + its decoded images -> the tensors of one training sample.

Label convention (Megatron's): the model sees ``tokens = ids[:-1]`` and is trained to predict
``labels = ids[1:]``, so ``labels[i]`` is the target *at* position ``i`` (already shifted; no shift
in the loss). ``loss_mask[i]`` (float32, 1.0 or 0.0) says whether ``labels[i]`` counts; it is 0 for
image, fake-image and pad targets, and with ``answer_loss_only`` for everything outside assistant
answers (see ``chat.py``). The training flag ``--answer-loss-only`` is opt-in (default: every text
token counts); the ``SampleEncoder`` constructor keeps ``answer_loss_only=True`` for library callers.

Too long: a sample whose ``tokens`` would exceed ``seq_length`` is cut at ``seq_length`` when no
``<image>`` or ``<fake_token_around_image>`` token lies at or after the cut (an image's token block
must reach the model whole, and that includes the label of the last kept position); otherwise it
is dropped with ``SkipSample("too_long_image_cut")``. A sample left with no target is dropped with
``SkipSample("no_trainable_tokens")``.

Settings come, in this order of precedence, from the constructor's arguments, the model folder's
image processor settings (``preprocessor_config.json`` or ``processor_config.json``),
``config.json``, and Idefics2's defaults.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megatron_patch.data.chat import IMAGE_TOKEN, ChatTokenizer, check_messages
from megatron_patch.data.errors import SkipSample
from megatron_patch.data.image_processing import Idefics2ImageTransform, ImageProcessingConfig, read_saved_settings
from megatron_patch.data.settings import DataSettings

DEFAULT_IMAGE_SEQ_LEN = 64  # perceiver latents of the released Idefics2


def read_image_seq_len(model_dir: Path) -> Optional[int]:
    """Image tokens per image from a saved processor_config.json or config.json, if either says."""
    processor = model_dir / "processor_config.json"
    if processor.is_file():
        value = json.loads(processor.read_text()).get("image_seq_len")
        if value:
            return int(value)
    config = model_dir / "config.json"
    if config.is_file():
        value = (json.loads(config.read_text()).get("perceiver_config") or {}).get("resampler_n_latents")
        if value:
            return int(value)
    return None


def shift_and_truncate(ids: np.ndarray, target: np.ndarray, seq_length: int, image_ids, sample_id: str):
    """(tokens, labels, loss_mask) of at most seq_length positions, applying the truncation rule."""
    if len(ids) < 2:
        raise SkipSample("no_trainable_tokens", f"sample {sample_id}: {len(ids)} token(s)")
    if len(ids) - 1 > seq_length:
        if np.isin(ids[seq_length:], image_ids).any():
            raise SkipSample("too_long_image_cut",
                             f"sample {sample_id}: {len(ids) - 1} tokens > --seq-length {seq_length} and the cut hits an image")
        ids, target = ids[: seq_length + 1], target[: seq_length + 1]
    loss_mask = target[1:].astype(np.float32)
    if not loss_mask.any():
        raise SkipSample("no_trainable_tokens", f"sample {sample_id}: nothing to train on after masking")
    return ids[:-1], ids[1:], loss_mask


class SampleEncoder:
    """Encodes records for one model: tokenizer, chat format, image processing, labels."""

    def __init__(
        self,
        tokenizer_dir,
        seq_length: int,
        answer_loss_only: bool = True,
        longest_edge: Optional[int] = None,
        shortest_edge: Optional[int] = None,
        image_splitting: Optional[bool] = None,
        image_seq_len: Optional[int] = None,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        rescale_factor: Optional[float] = None,
        processor_dir=None,
        tokenizer=None,
    ):
        """``tokenizer_dir``: folder saved with the model (AutoTokenizer); ``processor_dir``: where
        image processor settings live, default the same folder. ``None`` settings come from there."""
        from transformers import AutoTokenizer

        if seq_length < 2:
            raise ValueError(f"--seq-length must be >= 2, got {seq_length}")
        self.seq_length = int(seq_length)
        tokenizer_dir = Path(tokenizer_dir)
        model_dir = Path(processor_dir) if processor_dir is not None else tokenizer_dir
        overrides = dict(longest_edge=longest_edge, shortest_edge=shortest_edge, image_splitting=image_splitting,
                         image_mean=image_mean, image_std=image_std, rescale_factor=rescale_factor)
        if read_saved_settings(model_dir)[0] is not None:
            self.image_config = ImageProcessingConfig.from_preprocessor_config(model_dir, **overrides)
        else:
            self.image_config = ImageProcessingConfig().with_overrides(**overrides)
        self.image_seq_len = int(image_seq_len or read_image_seq_len(model_dir) or DEFAULT_IMAGE_SEQ_LEN)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(tokenizer_dir)
        self.chat = ChatTokenizer(self.tokenizer, self.image_seq_len, self.image_config.crops_per_image,
                                  answer_loss_only=answer_loss_only)
        self.transform = Idefics2ImageTransform(self.image_config)
        self._image_ids = np.array([self.chat.image_token_id, self.chat.fake_image_token_id])

    @property
    def pad_token_id(self) -> int:
        return self.chat.pad_token_id

    def encode(self, record: dict, images: Sequence[Image.Image]) -> dict:
        """Tensors of one sample (see the module docstring for the conventions).

        Returns tokens / labels / position_ids (int64 [L]), loss_mask (float32 [L]) with L <= seq_length,
        pixel_values (list of uint8 ``PendingImage``s, one per vision input: 5 per image when splitting;
        ``collate`` normalises them into the float32 batch; ``.tensor()`` gives one alone),
        num_images (= len(pixel_values)) and id.
        """
        sample_id = str(record.get("id", "?"))
        messages = record.get("messages")
        check_messages(messages, sample_id)
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if placeholders != len(images):
            raise SkipSample("image_count_mismatch",
                             f"sample {sample_id}: {placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
        ids, target = self.chat.encode(messages, sample_id)
        tokens, labels, loss_mask = shift_and_truncate(ids, target, self.seq_length, self._image_ids, sample_id)
        pixel_values = self.transform(images, where=f"sample {sample_id}: ")
        return {
            "id": sample_id,
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(len(tokens), dtype=torch.int64),
            "pixel_values": pixel_values,
            "num_images": len(pixel_values),
        }

    __call__ = encode


def add_encoder_arguments(parser):
    """Register the encoder's flags (for entry points that do not define them). ``None`` defaults
    mean "from the model folder's saved processor settings, else Idefics2's defaults". Packing is
    the loader's business: ``--pack-sequences`` lives in ``loader.add_data_arguments``."""
    group = parser.add_argument_group("data encoding")
    group.add_argument("--image-size", type=int, default=None,
                       help=f"longest image edge after resizing (default: saved setting, else {ImageProcessingConfig.longest_edge})")
    group.add_argument("--shortest-edge", type=int, default=None,
                       help=f"floor for each image side (default: saved setting, else {ImageProcessingConfig.shortest_edge})")
    group.add_argument("--image-splitting", action=argparse.BooleanOptionalAction, default=None,
                       help="feed each image as 4 crops + the whole image (default: saved setting, else off)")
    group.add_argument("--image-seq-len", type=int, default=None,
                       help=f"<image> tokens per image = perceiver latents (default: saved, else {DEFAULT_IMAGE_SEQ_LEN})")
    group.add_argument("--answer-loss-only", action=argparse.BooleanOptionalAction, default=False,
                       help="train on assistant answers only (default off: every text token counts)")
    return parser


def encoder_from_settings(settings: DataSettings, tokenizer_dir) -> SampleEncoder:
    """``SampleEncoder`` from the data settings (``seq_length`` plus the fields of the flags above); the
    loss covers every text token unless ``settings.answer_loss_only`` is set."""
    return SampleEncoder(
        tokenizer_dir, settings.seq_length,
        answer_loss_only=settings.answer_loss_only,
        longest_edge=settings.image_size,
        shortest_edge=settings.shortest_edge,
        image_splitting=settings.image_splitting,
        image_seq_len=settings.image_seq_len,
    )
