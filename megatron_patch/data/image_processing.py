"""Idefics2 image processing: RGB conversion, optional 4+1 splitting, resize, rescale + normalise.

The numbers equal transformers' ``Idefics2ImageProcessor`` (its PIL backend, which is what runs when
torchvision is absent) bit for bit; ``tests/data/test_image_processing.py`` holds us to that. What we
do differently is only *how*, because this is the data loader's hot path:

* the image stays a PIL image until after the resize (HF goes PIL -> numpy -> PIL -> numpy);
* splitting crops the PIL image (the same pixels HF slices out of its array);
* rescale and normalise: the input is uint8, so each channel has only 256 possible outputs, and
  a table of them built with HF's arithmetic (float64 rescale, cast to float32, float32
  ``(x - mean) / std``) gives exact results by look-up. When mean and std are the same for all
  channels (Idefics2's 0.5) in-place float32 ops on the whole array are faster still; at start-up
  we run them on all 256 levels and use them only if they reproduce the table exactly.

Padding to the batch's largest image (``pixel_attention_mask``) happens in ``collate.py``; this
module returns unpadded ``[3, h, w]`` float32 tensors, one per vision input (5 per image when
splitting: the 4 quarter crops, then the whole image, HF's order).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megatron_patch.data.errors import SkipSample

# Idefics2's processor normalisation (IMAGENET_STANDARD_MEAN/STD) and rescale factor.
IDEFICS2_IMAGE_MEAN = (0.5, 0.5, 0.5)
IDEFICS2_IMAGE_STD = (0.5, 0.5, 0.5)
DEFAULT_LONGEST_EDGE = 378
# HF's own default shortest_edge is 378, which together with longest_edge=378 would stretch every
# image to a 378x378 square. We keep aspect ratios and only stop a side from falling below one
# SigLIP patch (14 px); a model's preprocessor_config.json, when loaded, overrides both.
DEFAULT_SHORTEST_EDGE = 14
CROPS_PER_SPLIT_IMAGE = 5  # 4 quarters + the whole image


@dataclass(frozen=True)
class ImageProcessingConfig:
    """Settings of the Idefics2 image processor (the fields of its preprocessor_config.json)."""

    longest_edge: int = DEFAULT_LONGEST_EDGE
    """Images whose longest side exceeds this are shrunk to it, keeping the aspect ratio."""
    shortest_edge: int = DEFAULT_SHORTEST_EDGE
    """After that, each side is raised to at least this (HF's rule; this one can distort)."""
    image_splitting: bool = False
    """Feed each image as its 4 quarter crops plus the whole image (5 vision inputs)."""
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple = IDEFICS2_IMAGE_MEAN
    image_std: tuple = IDEFICS2_IMAGE_STD
    resample: int = int(Image.Resampling.BILINEAR)
    """PIL resampling filter id (2 = bilinear, Idefics2's)."""

    def __post_init__(self):
        if self.longest_edge < 1 or self.shortest_edge < 1:
            raise ValueError(f"image sizes must be >= 1, got longest_edge={self.longest_edge} shortest_edge={self.shortest_edge}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values (RGB), got {self.image_mean} / {self.image_std}")
        if not self.do_convert_rgb:
            raise ValueError("do_convert_rgb=False is not supported: the vision tower takes 3-channel RGB")

    @property
    def crops_per_image(self) -> int:
        return CROPS_PER_SPLIT_IMAGE if self.image_splitting else 1

    @classmethod
    def from_preprocessor_config(cls, path, **overrides) -> "ImageProcessingConfig":
        """Read the settings saved with a model (a folder or a json file); non-None overrides win.

        A folder may hold them as ``preprocessor_config.json`` (transformers 4) or as the
        ``image_processor`` entry of ``processor_config.json`` (transformers 5).
        """
        raw, where = read_saved_settings(Path(path))
        if raw is None:
            raise ValueError(f"no image processor settings in {path} (preprocessor_config.json / processor_config.json)")
        size = raw.get("size") or {}
        if "longest_edge" not in size and ("height" in size or "width" in size):
            raise ValueError(f"{where}: size {size} is fixed height/width; Idefics2 needs longest_edge/shortest_edge")
        values = {
            "longest_edge": size.get("longest_edge"),
            "shortest_edge": size.get("shortest_edge"),
            "image_splitting": raw.get("do_image_splitting"),
        }
        for f in fields(cls):
            if f.name in raw:
                values[f.name] = raw[f.name]
        return cls().with_overrides(**values).with_overrides(**overrides)

    def with_overrides(self, **values) -> "ImageProcessingConfig":
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown image processing setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {k: v for k, v in values.items() if v is not None}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(float(x) for x in values[key])
        return replace(self, **values)

    def hf_kwargs(self) -> dict:
        """Keyword arguments that build the equivalent transformers ``Idefics2ImageProcessor``."""
        return dict(
            size={"longest_edge": self.longest_edge, "shortest_edge": self.shortest_edge},
            do_image_splitting=self.image_splitting, do_convert_rgb=self.do_convert_rgb,
            do_resize=self.do_resize, do_rescale=self.do_rescale, do_normalize=self.do_normalize,
            rescale_factor=self.rescale_factor, image_mean=list(self.image_mean),
            image_std=list(self.image_std), resample=self.resample, do_pad=True,
        )


def read_saved_settings(path: Path) -> tuple[Optional[dict], Path]:
    """(image processor settings dict or None, the file they came from)."""
    candidates = [path] if path.is_file() else [path / "preprocessor_config.json", path / "processor_config.json"]
    for file in candidates:
        if not file.is_file():
            continue
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read image processor settings from {file}: {exc}") from None
        if file.name == "processor_config.json" or "image_processor" in raw:
            raw = raw.get("image_processor")
        if isinstance(raw, dict):
            return raw, file
    return None, path


def resized_size(height: int, width: int, longest_edge: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after Idefics2's resize rule: shrink the longest side, then floor each side.

    The float expressions mirror HF's so that the int() truncation lands on the same pixel.
    """
    ratio = width / height
    if width >= height and width > longest_edge:
        width, height = longest_edge, int(longest_edge / ratio)
    elif height > width and height > longest_edge:
        height, width = longest_edge, int(longest_edge * ratio)
    return max(height, shortest_edge), max(width, shortest_edge)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy-free when possible; transparency is composited onto white (HF's convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def split_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes of the 4 quarters (row-major) and the whole image, HF's order and rounding."""
    mw, mh = width // 2, height // 2
    return [(0, 0, mw, mh), (mw, 0, width, mh), (0, mh, mw, height), (mw, mh, width, height), (0, 0, width, height)]


class Idefics2ImageTransform:
    """Callable turning the PIL images of one sample into a list of ``[3, h, w]`` float32 tensors."""

    def __init__(self, config: Optional[ImageProcessingConfig] = None):
        self.config = config or ImageProcessingConfig()
        self._lut = self._build_lut(self.config)
        self._divisor = np.float32(1 / self.config.rescale_factor) if self.config.do_rescale else None
        # Scalar (not per-channel broadcast) numpy ops are the fast ones, so only uniform mean/std.
        uniform = len(set(self.config.image_mean)) == 1 and len(set(self.config.image_std)) == 1
        self._mean = np.float32(self.config.image_mean[0])
        self._std = np.float32(self.config.image_std[0])
        levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
        self._arithmetic_exact = uniform and np.array_equal(self._arithmetic(levels)[:, 0, :], self._lut)

    @staticmethod
    def _build_lut(cfg: ImageProcessingConfig) -> np.ndarray:
        """[3, 256] float32: the processed value of every uint8 level, per channel (HF's arithmetic)."""
        levels = np.arange(256, dtype=np.uint8)
        values = levels.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else levels
        values = np.broadcast_to(values.astype(np.float32), (3, 256))
        if cfg.do_normalize:
            mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    def _arithmetic(self, pixels: np.ndarray) -> np.ndarray:
        """[h, w, 3] uint8 -> [3, h, w] float32 by in-place scalar float32 ops (exact when checked)."""
        out = pixels.transpose(2, 0, 1).astype(np.float32)
        if self._divisor is not None:
            out /= self._divisor
        if self.config.do_normalize:
            out -= self._mean
            out /= self._std
        return out

    def _resize(self, image: Image.Image) -> Image.Image:
        if not self.config.do_resize:
            return image
        h, w = resized_size(image.height, image.width, self.config.longest_edge, self.config.shortest_edge)
        if (w, h) == image.size:
            return image  # PIL would return an identical copy
        return image.resize((w, h), resample=self.config.resample)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image)  # [h, w, 3] uint8
        if self._arithmetic_exact:
            return torch.from_numpy(self._arithmetic(pixels))
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], pixels[..., c], out=out[c], mode="clip")
        return torch.from_numpy(out)

    def process_image(self, image: Image.Image, where: str = "") -> list[torch.Tensor]:
        """The vision inputs of one image: [whole] or [4 quarters..., whole] when splitting."""
        if image.width < 1 or image.height < 1 or (self.config.image_splitting and min(image.size) < 2):
            raise SkipSample("image_too_small", f"{where}image of {image.width}x{image.height} px")
        rgb = to_rgb(image)
        if not self.config.image_splitting:
            return [self._to_tensor(self._resize(rgb))]
        crops = []
        for box in split_boxes(*rgb.size):
            crop = rgb if box == (0, 0) + rgb.size else rgb.crop(box)
            crops.append(self._to_tensor(self._resize(crop)))
        return crops

    def __call__(self, images: Sequence[Image.Image], where: str = "") -> list[torch.Tensor]:
        out = []
        for i, image in enumerate(images):
            out.extend(self.process_image(image, f"{where}image {i}: "))
        return out


def pad_images(per_sample: Sequence[Sequence[torch.Tensor]]):
    """Pad the vision inputs of a batch to one tensor, bottom/right, HF's layout.

    Returns pixel_values [B, max_images, 3, H, W] float32 (zeros in padding),
    pixel_attention_mask [B, max_images, H, W] bool (True on real pixels) and
    image_mask [B, max_images] bool (True for real images; padding images are never
    inferred from their pixels). With no image in the batch, max_images, H and W are 0.
    """
    batch = len(per_sample)
    max_images = max((len(s) for s in per_sample), default=0)
    sizes = [img.shape[-2:] for s in per_sample for img in s]
    height = max((h for h, _ in sizes), default=0)
    width = max((w for _, w in sizes), default=0)
    # numpy's zeros come from calloc: fresh zero pages, so only the bytes we write cost time,
    # where torch.zeros would first memset the whole (mostly overwritten) buffer.
    pixel_values = torch.from_numpy(np.zeros((batch, max_images, 3, height, width), dtype=np.float32))
    pixel_mask = torch.from_numpy(np.zeros((batch, max_images, height, width), dtype=np.bool_))
    image_mask = torch.zeros(batch, max_images, dtype=torch.bool)
    for b, images in enumerate(per_sample):
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            pixel_values[b, i, :, :h, :w] = img
            pixel_mask[b, i, :h, :w] = True
            image_mask[b, i] = True
    return pixel_values, pixel_mask, image_mask
