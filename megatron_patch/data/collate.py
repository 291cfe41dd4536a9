"""Encoded samples (or packed sequences) -> one fixed-shape micro-batch.

Every micro-batch is ``[B, seq_length]`` (Megatron schedules want fixed shapes). This is what the
model receives: ``training/micro_batches.py`` moves each micro-batch to the ranks and devices that
need it and hands it to the model, normalising raw pixels on the way (nothing else changes). Tensors:

=======================  ===========================  ==========================================
key                      shape, dtype                 meaning
=======================  ===========================  ==========================================
tokens                   [B, L] int64                 input ids; pad token after the real ones
labels                   [B, L] int64                 target of each position (already shifted);
                                                      0 on padding
loss_mask                [B, L] float32               1.0 where labels count; 0 on padding
position_ids             [B, L] int64                 0.. per sample (restart per packed sample;
                                                      the padding tail counts from 0 too)
attention_mask           [B, L] int64                 1 on real tokens, 0 on padding. HF-style
                                                      padding mask, NOT megatron-core's [b,1,s,s]
                                                      "True = masked" mask; with right padding
                                                      and causal attention none is needed
pixel_values             [B, N, 3, H, W] float32      vision inputs, zero-padded bottom/right to
                                                      the batch's largest; N = most per row
pixel_attention_mask     [B, N, H, W] bool            True on real pixels
image_mask               [B, N] bool                  True for real vision inputs (padding images
                                                      are never inferred from zero pixels)
pixel_norm (raw pixels)  [k, 4] or [3, 256] float32  with ``raw_pixels``: pixel_values are the
                                                      uint8 levels [B, N, 3, H, W] and this is the
                                                      normalisation (``Normaliser.as_tensor``);
                                                      absent when the batch has no image
num_images               [B] int64                    real vision inputs per row
cu_seqlens  (packed)     [S + 1] int32                sequence boundaries over the flattened
                                                      [B * L] tokens: each packed sample is one
                                                      segment and each row's padding tail another;
                                                      the model builds its attention segments
                                                      from them (training keeps them on the host)
=======================  ===========================  ==========================================

Python values, counted here on the host so that nothing downstream reads a device tensor back
(a host sync on a GPU) to learn a size:

=======================  ===========================  ==========================================
image_sizes              list of (h, w) ints          height and width of each real vision input,
                                                      in batch order (row by row, as image_mask);
                                                      its real patches are (h // p) x (w // p)
image_tokens             list of B ints               ``<image>`` tokens per row (only when the
                                                      collator knows ``image_token_id``), which
                                                      the model checks against num_images
max_seqlen  (packed)     int                          longest segment of cu_seqlens
=======================  ===========================  ==========================================

Vision inputs of a row are in the order of its ``<image>`` blocks (packed samples: concatenated in
sample order), which is the order the model merges them in. A sample's ``pixel_values`` are the
encoder's uint8 ``PendingImage``s, normalised straight into the batch by ``pad_images``, or float
``[3, h, w]`` tensors. Training collates ``raw_pixels``: the uint8 levels travel to the other ranks
and to the GPU (4x fewer bytes than float32) and are normalised there one micro-batch at a time,
with the same numbers, then cast to the model's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_patch.data.image_processing import pad_images


def collate(samples: Sequence[dict], seq_length: int, pad_token_id: int, raw_pixels: bool = False,
            image_token_id: Optional[int] = None) -> dict:
    """Stack encoder outputs (``SampleEncoder.encode``) or packed sequences (``packing.pack``);
    ``image_token_id`` (the tokenizer's ``<image>``) adds the per-row ``image_tokens`` counts."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    batch, length = len(samples), int(seq_length)
    tokens = torch.full((batch, length), int(pad_token_id), dtype=torch.int64)
    labels = torch.zeros(batch, length, dtype=torch.int64)
    loss_mask = torch.zeros(batch, length, dtype=torch.float32)
    position_ids = torch.zeros(batch, length, dtype=torch.int64)
    attention_mask = torch.zeros(batch, length, dtype=torch.int64)
    packed = any("seq_lens" in s for s in samples)
    boundaries = [0]
    for b, s in enumerate(samples):
        n = len(s["tokens"])
        if n > length:
            raise ValueError(f"sample {s.get('id', b)} has {n} tokens > --seq-length {length}; encode with the same seq_length")
        tokens[b, :n] = s["tokens"]
        labels[b, :n] = s["labels"]
        loss_mask[b, :n] = s["loss_mask"]
        position_ids[b, :n] = s["position_ids"]
        position_ids[b, n:] = torch.arange(length - n)
        attention_mask[b, :n] = 1
        if packed:
            row = b * length
            for seg in s.get("seq_lens", [n]):
                row += int(seg)
                boundaries.append(row)
            if n < length:
                boundaries.append((b + 1) * length)  # the padding tail attends only to itself
    images = pad_images([s["pixel_values"] for s in samples], raw=raw_pixels)
    pixel_values, pixel_attention_mask, image_mask = images[:3]
    out = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_attention_mask,
        "image_mask": image_mask,
        "num_images": torch.tensor([len(s["pixel_values"]) for s in samples], dtype=torch.int64),
        "image_sizes": [(int(img.shape[-2]), int(img.shape[-1])) for s in samples for img in s["pixel_values"]],
    }
    if image_token_id is not None:
        out["image_tokens"] = (tokens == int(image_token_id)).sum(dim=1).tolist()
    if raw_pixels and images[3] is not None:
        out["pixel_norm"] = images[3]
    if packed:
        out["cu_seqlens"] = torch.tensor(boundaries, dtype=torch.int32)
        out["max_seqlen"] = max(end - start for start, end in zip(boundaries, boundaries[1:]))
    return out


def empty_sample() -> dict:
    """A row with no sample (a failed slot, or past the end of a finite set): all pad, zero loss mask."""
    none = torch.zeros(0, dtype=torch.int64)
    return {"id": "", "tokens": none, "labels": none, "loss_mask": torch.zeros(0), "position_ids": none,
            "pixel_values": [], "num_images": 0}


class Collator:
    """``collate`` bound to one model's seq_length, pad token, pixel form and ``<image>`` token, for
    ``DataLoader(collate_fn=...)``."""

    def __init__(self, seq_length: int, pad_token_id: int, raw_pixels: bool = False,
                 image_token_id: Optional[int] = None):
        self.seq_length, self.pad_token_id, self.raw_pixels = int(seq_length), int(pad_token_id), raw_pixels
        self.image_token_id = image_token_id

    def __call__(self, samples: Sequence[dict]) -> dict:
        return collate(samples, self.seq_length, self.pad_token_id, self.raw_pixels, self.image_token_id)
