"""Host-side sizes of a micro-batch's vision inputs, so that the forward reads nothing back from the device.

On a GPU, every Python number taken from a device tensor (``int(t)``, ``t.item()``, ``t.tolist()``,
``torch.equal``, a boolean-mask index whose result size depends on the mask) is a host sync: the
host stops queueing kernels until the device has caught up. The sizes the first stage needs (how
many real images and patches, the longest image, the ``<image>`` tokens of each row for the check)
are known on the host where the micro-batch is collated (``data/collate.py``: ``num_images``,
``image_tokens``, ``image_sizes``); training passes them in as ``ImageCounts``. A caller with
tensors only gets them measured (``ImageCounts.measure``: those reads, once per forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from megatron_patch.models.idefics2.vision import patch_attention_mask


class ImageTokenMismatch(ValueError):
    """A sample's <image> tokens do not match its images' features (e.g. cut by --seq-length)."""


@dataclass(frozen=True)
class ImageCounts:
    """Sizes of one micro-batch's vision inputs, as Python ints."""

    images_per_row: tuple
    """Real vision inputs of each row (``image_mask.sum(1)``)."""
    image_tokens_per_row: tuple
    """``<image>`` tokens of each row; each must be its images x the perceiver's latents."""
    patches: int
    """Real patches over every real vision input (a patch is real when all its pixels are)."""
    max_patches: int
    """Real patches of the largest vision input (0 without images)."""

    @property
    def images(self) -> int:
        return sum(self.images_per_row)

    @classmethod
    def from_sizes(cls, images_per_row: Iterable[int], image_tokens_per_row: Iterable[int],
                   image_sizes: Sequence[Sequence[int]], patch_size: int) -> "ImageCounts":
        """From the collator's host values: ``num_images``, ``image_tokens`` and the (h, w) of each real
        vision input (``image_sizes``); an image padded bottom/right has (h // p) x (w // p) real patches."""
        patches = [(int(h) // patch_size) * (int(w) // patch_size) for h, w in image_sizes]
        return cls(tuple(int(n) for n in images_per_row), tuple(int(n) for n in image_tokens_per_row),
                   sum(patches), max(patches, default=0))

    @classmethod
    def measure(cls, input_ids: torch.Tensor, image_mask: Optional[torch.Tensor],
                pixel_attention_mask: Optional[torch.Tensor], image_token_id: int, patch_size: int) -> "ImageCounts":
        """From the tensors themselves: reads them back (host syncs on a GPU, once per forward)."""
        tokens = (input_ids == image_token_id).sum(dim=1).tolist()
        images = image_mask.sum(dim=1).tolist() if image_mask is not None else [0] * len(tokens)
        patches = []
        if sum(images):
            real = pixel_attention_mask[image_mask.bool()].bool()
            patches = patch_attention_mask(real, patch_size).flatten(1).sum(dim=1).tolist()
        return cls(tuple(images), tuple(tokens), sum(patches), max(patches, default=0))

    def check(self, image_seq_len: int) -> None:
        """Raise ``ImageTokenMismatch`` naming the first row whose ``<image>`` tokens are not its features."""
        for b, (found, images) in enumerate(zip(self.image_tokens_per_row, self.images_per_row)):
            if found != images * image_seq_len:
                raise ImageTokenMismatch(
                    f"sample {b} of the micro-batch has {found} <image> tokens but {images} image(s) x "
                    f"{image_seq_len} latents = {images * image_seq_len} features; was the text truncated by "
                    f"--seq-length, or is the image mask wrong?"
                )


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices [count] of the True entries of ``mask`` (row-major), with their number known on
    the host: unlike ``mask.nonzero()`` or ``x[mask]``, no host sync to size the result."""
    return torch.nonzero_static(mask.reshape(-1), size=count).squeeze(1)
