"""The project's one FLOP count: FLOPs of a training iteration of Idefics2, and peaks for MFU.

Throughput (TFLOP/s per device) and MFU are computed from this count only (torchtitan's rule: one
formula, one place). Only matrix multiplications are counted, 2 FLOPs per multiply-add; norms,
activations, softmax, biases, RoPE and the loss are left out (a fraction of a percent).

Forward FLOPs per component (upstream -> downstream: vision -> connector -> llm):

- **llm**: Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py) for a
  GQA SwiGLU decoder, per iteration ``6 B s [L (3 h f + h (q + 2k) + q h + q s) + h V]`` with B s =
  rows x padded seq_length, q = kv_channels x heads, k = kv_channels x query groups, V = vocabulary;
  the forward is a third of that. ``q s`` is causal attention (half the s x s scores), so packed
  or padded rows count as full rows, as in Megatron. With Mistral's sliding window W below s a
  token attends to at most W keys: ``q s`` becomes ``q (2 W - W^2 / s)`` (the window's share of the
  pairs). Megatron-LM has no vision term.
- **vision** (SigLIP), per vision input of P real patches: patch convolution ``2 P (3 p^2) h``,
  then per layer ``2 P (4 h^2 + 2 h I) + 4 P^2 h`` (QKV + output projection, MLP, scores + values).
- **connector**: gated-MLP modality projection over the real patches, ``2 P (2 h_v I_t + I_t h)``,
  and per perceiver layer with n latents: q/o projections over n rows, k/v over P + n rows,
  attention ``4 n (P + n) q``, gated MLP of width 4 h over n rows (``config.build_configs``).

Only real patches count (padding patches of smaller images in a batch are not useful work), the
same way the model finds them (``vision.patch_attention_mask``: a patch is real when all its pixels
are, as in transformers' Idefics2).

Backward: a component whose parameters train costs 3x its forward (input and weight gradients);
a frozen one that gradients still flow through (something upstream trains, or it holds LoRA
adapters, whose gradients need its input gradients from the loss down to them) 2x (input gradients
only; the adapters' own low-rank products are left out); a frozen one with nothing trainable in or
upstream of it 1x (forward only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from megatron_patch.models.idefics2.config import sliding_window

COMPONENTS = ("vision", "connector", "llm")
"""Freezable components, upstream first."""


@dataclass(frozen=True)
class BatchShapes:
    """Shapes of one global batch that the FLOP count needs, as plain sums (so they all-reduce).

    Add micro-batches with ``+``; all-reduce ``to_tensor()`` over data-parallel ranks with SUM and
    rebuild with ``from_tensor``.
    """

    rows: int
    """[seq_length] rows: micro-batch size x micro-batches x data-parallel size."""
    seq_length: int
    """Padded row length (the same for every micro-batch)."""
    num_images: int = 0
    """Real vision inputs."""
    patches: int = 0
    """Sum over vision inputs of their real patch count P."""
    patches_squared: int = 0
    """Sum over vision inputs of P^2 (attention is quadratic in P)."""

    @classmethod
    def from_patches(cls, rows: int, seq_length: int, image_patches: Iterable[int]) -> "BatchShapes":
        """From the real patch count of every vision input."""
        p = [int(x) for x in image_patches]
        return cls(int(rows), int(seq_length), len(p), sum(p), sum(x * x for x in p))

    @classmethod
    def from_batch(cls, batch: Mapping, patch_size: int) -> "BatchShapes":
        """From one collated micro-batch (keys of ``data/collate.py``): its rows and the collator's
        ``image_sizes`` (a real patch is a whole p x p block of an image padded bottom/right, as
        ``vision.patch_attention_mask`` finds them)."""
        rows, seq_length = batch["tokens"].shape
        patches = [(h // patch_size) * (w // patch_size) for h, w in batch["image_sizes"]]
        return cls.from_patches(rows, seq_length, patches)

    def __add__(self, other: "BatchShapes") -> "BatchShapes":
        if self.seq_length != other.seq_length:
            raise ValueError(f"cannot add batch shapes of seq_length {self.seq_length} and {other.seq_length}")
        return BatchShapes(
            self.rows + other.rows,
            self.seq_length,
            self.num_images + other.num_images,
            self.patches + other.patches,
            self.patches_squared + other.patches_squared,
        )

    @staticmethod
    def total(parts: Iterable["BatchShapes"]) -> "BatchShapes":
        """Sum of several micro-batches' shapes (at least one)."""
        parts = list(parts)
        if not parts:
            raise ValueError("BatchShapes.total needs at least one micro-batch")
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def to_tensor(self, device=None) -> torch.Tensor:
        """int64 [rows, num_images, patches, patches_squared]: all-reduce with SUM over DP."""
        values = [self.rows, self.num_images, self.patches, self.patches_squared]
        return torch.tensor(values, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, values: torch.Tensor, seq_length: int) -> "BatchShapes":
        rows, images, patches, squared = (int(v) for v in values.tolist())
        return cls(rows, int(seq_length), images, patches, squared)


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def vision_forward_flops(vision_config, shapes: BatchShapes) -> int:
    """SigLIP tower forward over the real patches of every vision input."""
    h, i, p = vision_config.hidden_size, vision_config.intermediate_size, vision_config.patch_size
    channels = getattr(vision_config, "num_channels", 3)
    P, P2 = shapes.patches, shapes.patches_squared
    embed = 2 * P * channels * p * p * h
    per_layer = 2 * P * (4 * h * h + 2 * h * i) + 4 * P2 * h
    return embed + vision_config.num_hidden_layers * per_layer


def connector_forward_flops(hf_config, shapes: BatchShapes) -> int:
    """Modality projection over the real patches + perceiver resampler, for every vision input."""
    v, c, t = hf_config.vision_config, hf_config.perceiver_config, hf_config.text_config
    P, images = shapes.patches, shapes.num_images
    projection = 2 * P * (2 * v.hidden_size * t.intermediate_size + t.intermediate_size * c.hidden_size)
    h, n = c.hidden_size, c.resampler_n_latents
    q = c.resampler_n_heads * c.resampler_head_dim
    k = c.num_key_value_heads * c.resampler_head_dim
    latents, context = images * n, P + images * n  # queries are the latents; keys/values [patches; latents]
    per_layer = (
        2 * latents * h * q  # q projection
        + 2 * context * h * 2 * k  # k and v projections
        + 4 * n * context * q  # scores and weighted values, per image n x (P + n)
        + 2 * latents * q * h  # output projection
        + 2 * latents * 3 * h * (4 * h)  # gated MLP (gate, up, down) of width 4h
    )
    return projection + c.resampler_depth * per_layer


def llm_forward_flops(text_config, shapes: BatchShapes, vocab_size: Optional[int] = None) -> int:
    """A third of Megatron-LM's training count for the decoder (causal attention) and the head."""
    h, f, L = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    d = _head_dim(text_config)
    q, k = d * text_config.num_attention_heads, d * text_config.num_key_value_heads
    V = text_config.vocab_size if vocab_size is None else vocab_size
    s = shapes.seq_length
    w = sliding_window(text_config)
    # Twice the attended (query, key) pairs per row: s^2 causal (Megatron's count), fewer in a window.
    pairs2 = s * s if w is None or w >= s else 2 * s * w - w * w
    dense = 2 * shapes.rows * s * (L * (3 * h * f + h * (q + 2 * k) + q * h) + h * V)
    return dense + 2 * shapes.rows * L * q * pairs2


def forward_flops(hf_config, shapes: BatchShapes, vocab_size: Optional[int] = None) -> dict[str, int]:
    """Forward FLOPs of each component, keyed by ``COMPONENTS``."""
    return {
        "vision": vision_forward_flops(hf_config.vision_config, shapes),
        "connector": connector_forward_flops(hf_config, shapes),
        "llm": llm_forward_flops(hf_config.text_config, shapes, vocab_size),
    }


def backward_multipliers(frozen: Iterable[str] = frozenset(), adapted: Iterable[str] = frozenset()) -> dict[str, int]:
    """Forward+backward cost as a multiple of the forward: 3 trained, 2 frozen but holding LoRA
    adapters (`adapted`) or below a trained or adapted part, 1 else."""
    frozen, adapted = set(frozen), set(adapted)
    unknown = (frozen | adapted) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown frozen component(s) {sorted(unknown)}; known: {list(COMPONENTS)}")
    out, upstream_trains = {}, False
    for name in COMPONENTS:
        if name not in frozen:
            out[name], upstream_trains = 3, True
        else:
            out[name] = 2 if upstream_trains or name in adapted else 1
            upstream_trains = upstream_trains or name in adapted
    return out


def training_flops(
    hf_config, shapes: BatchShapes, frozen: Iterable[str] = frozenset(), vocab_size: Optional[int] = None,
    adapted: Iterable[str] = frozenset(),
) -> float:
    """FLOPs of one training iteration (forward + backward) over the whole global batch and model.

    `frozen`: names from ``COMPONENTS`` whose weights do not train; `adapted`: those holding LoRA
    adapters. `vocab_size`: the LM head's rows if not the HF vocabulary (pass the TP-padded size to
    match Megatron-LM, which counts ``padded_vocab_size``).
    """
    forward = forward_flops(hf_config, shapes, vocab_size)
    multipliers = backward_multipliers(frozen, adapted)
    return float(sum(multipliers[name] * forward[name] for name in COMPONENTS))


# ---------------------------------------------------------------- peaks and MFU

# Dense bf16 tensor-core peaks (TFLOP/s), vendor datasheets (torchtitan keeps the same table),
# matched as whole words of the device name; the first match wins, so specific names come first.
_PEAK_BF16_TFLOPS = (
    (r"H200 NVL", 835.0),
    (r"G?H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),  # SXM reports as "NVIDIA H100 80GB HBM3"
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"L40", 181.0),
    (r"A10G?", 125.0),  # the A10 datasheet figure, also used for A10G
)


def peak_tflops(device: Optional[str]) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a device named like ``torch.cuda.get_device_name()``; None if unknown."""
    if not device:
        return None
    for pattern, peak in _PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", device, flags=re.IGNORECASE):
            return peak
    return None


def device_name() -> Optional[str]:
    """This process's CUDA device name, or None on CPU."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def tflops_per_device(flops: float, seconds: float, num_devices: int) -> float:
    """Achieved TFLOP/s per device: the iteration's FLOPs over its time and every device (TP x PP x DP)."""
    return flops / seconds / num_devices / 1e12


def mfu(flops: float, seconds: float, num_devices: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation as a fraction of `peak` (TFLOP/s per device); None when the peak is unknown."""
    if peak is None:
        return None
    return tflops_per_device(flops, seconds, num_devices) / peak
