"""Idefics2 image processing: RGB conversion, optional 4+1 splitting, resize, rescale + normalise.

The numbers equal transformers' ``Idefics2ImageProcessor`` (its PIL backend, which is what runs when
torchvision is absent) bit for bit; ``tests/data/test_image_processing.py`` holds us to that. What we
do differently is only *how*, because this is the data loader's hot path:

* the image stays a PIL image until after the resize (HF goes PIL -> numpy -> PIL -> numpy);
* splitting crops the PIL image (the same pixels HF slices out of its array);
* rescale + normalise (``Normaliser``) runs the fewest float32 passes that reproduce HF's numbers
  on every uint8 level (checked at start-up), and only when ``pad_images`` writes the image into
  the padded batch: until then a vision input is a ``PendingImage`` holding uint8 pixels.

The transform returns one ``PendingImage`` per vision input (5 per image when splitting: the 4
quarter crops, then the whole image, HF's order); ``pad_images`` (called by ``collate.py``) turns
a batch of them into HF's padded ``pixel_values`` + ``pixel_attention_mask``.
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


class Normaliser:
    """Rescale + normalise uint8 ``[h, w, 3]`` pixels into a float32 ``[3, h, w]`` buffer, HF's numbers.

    The input is uint8, so each channel has only 256 possible outputs: a table of them built with
    HF's arithmetic (float64 rescale, cast to float32, float32 ``(x - mean) / std``) is exact by
    construction. In-place float32 ops on the whole image are faster than a look-up, so at start-up
    we run candidate op sequences on all 256 levels of every channel and keep the first that
    reproduces the table bit for bit; the table is the fallback. For Idefics2's settings the fused
    ``x / 127.5 - 1`` qualifies (dividing by std = 0.5 is exact, so it commutes with the rounding).
    """

    def __init__(self, config: ImageProcessingConfig):
        self.lut = self._build_lut(config)
        self.steps = None  # the in-place float32 ops in use; None: the look-up table
        levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
        out = np.empty((3, 1, 256), np.float32)
        for steps in self._candidate_steps(config):
            self.steps = steps
            self(levels, out)
            if np.array_equal(out[:, 0, :], self.lut):
                return
        self.steps = None

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

    @staticmethod
    def _candidate_steps(cfg: ImageProcessingConfig):
        """In-place (ufunc, float32 constant) sequences, fewest passes first."""
        def const(values):  # a scalar when all channels agree: scalar ops are the fast ones
            values = np.asarray(values, np.float64)
            return np.float32(values[0]) if len(set(values.tolist())) == 1 else values.astype(np.float32)[:, None, None]

        divisor = 1 / cfg.rescale_factor
        mean, std = np.asarray(cfg.image_mean, np.float64), np.asarray(cfg.image_std, np.float64)
        if cfg.do_rescale and cfg.do_normalize:
            yield [(np.divide, const(divisor * std)), (np.subtract, const(mean / std))]
        rescale = [(np.divide, const([divisor] * 3))] if cfg.do_rescale else []
        normalise = [(np.subtract, const(mean)), (np.divide, const(std))] if cfg.do_normalize else []
        yield rescale + normalise

    _OPS = {np.divide: 1.0, np.subtract: 2.0}

    def as_tensor(self) -> torch.Tensor:
        """This normalisation for ``normalise_pixels``: the in-place ops in use as rows
        ``[op (1 divide, 2 subtract), value per channel x 3]`` float32, or, without them, the table
        ``[3, 256]``."""
        if self.steps is None:
            return torch.from_numpy(self.lut.copy())
        rows = [[self._OPS[ufunc], *np.broadcast_to(np.asarray(value, np.float32).reshape(-1), (3,))]
                for ufunc, value in self.steps]
        return torch.tensor(rows, dtype=torch.float32)

    def __call__(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """Write pixels [h, w, 3] uint8 into out [3, h, w] float32 (may be a view into a batch)."""
        if self.steps is None:
            for c in range(3):
                np.take(self.lut[c], pixels[..., c], out=out[c], mode="clip")
            return
        # Work on a contiguous temporary and copy once: in-place ops on it are fast and, freed right
        # away, its memory is reused warm; ops straight on the strided batch slot measured slower.
        work = pixels.transpose(2, 0, 1).astype(np.float32, order="C")
        for ufunc, value in self.steps:
            ufunc(work, value, out=work)
        out[...] = work


class PendingImage:
    """One vision input, resized but still uint8: normalised only when written into the batch.

    Deferring the float conversion to ``pad_images`` means one transient float buffer at a time
    (reused warm) instead of a float copy of every image held until collate, and buffered samples
    (packing) 4x smaller. ``shape`` is the float tensor's ``[3, h, w]``; ``tensor()`` gives it alone.
    """

    __slots__ = ("pixels", "normaliser")

    def __init__(self, pixels: np.ndarray, normaliser: Normaliser):
        self.pixels, self.normaliser = pixels, normaliser

    @property
    def shape(self) -> torch.Size:
        return torch.Size((3,) + self.pixels.shape[:2])

    def write_to(self, out: np.ndarray) -> None:
        self.normaliser(self.pixels, out)

    def tensor(self) -> torch.Tensor:
        out = np.empty(tuple(self.shape), np.float32)
        self.write_to(out)
        return torch.from_numpy(out)


class Idefics2ImageTransform:
    """Callable turning the PIL images of one sample into a list of ``PendingImage`` vision inputs."""

    def __init__(self, config: Optional[ImageProcessingConfig] = None):
        self.config = config or ImageProcessingConfig()
        self.normaliser = Normaliser(self.config)

    def _resize(self, image: Image.Image) -> Image.Image:
        if not self.config.do_resize:
            return image
        h, w = resized_size(image.height, image.width, self.config.longest_edge, self.config.shortest_edge)
        if (w, h) == image.size:
            return image  # PIL would return an identical copy
        return image.resize((w, h), resample=self.config.resample)

    def resized_crops(self, image: Image.Image, where: str = "") -> list[Image.Image]:
        """The resized RGB vision inputs of one image: [whole] or [4 quarters..., whole] when splitting."""
        if image.width < 1 or image.height < 1 or (self.config.image_splitting and min(image.size) < 2):
            raise SkipSample("image_too_small", f"{where}image of {image.width}x{image.height} px")
        rgb = to_rgb(image)
        whole = (0, 0) + rgb.size
        boxes = split_boxes(*rgb.size) if self.config.image_splitting else [whole]
        return [self._resize(rgb if box == whole else rgb.crop(box)) for box in boxes]

    def process_image(self, image: Image.Image, where: str = "") -> list[PendingImage]:
        """``resized_crops`` as uint8 arrays (one PIL -> numpy conversion each), normalised later."""
        return [PendingImage(np.asarray(crop), self.normaliser) for crop in self.resized_crops(image, where)]

    def __call__(self, images: Sequence[Image.Image], where: str = "") -> list[PendingImage]:
        out = []
        for i, image in enumerate(images):
            out.extend(self.process_image(image, f"{where}image {i}: "))
        return out


def pad_images(per_sample: Sequence[Sequence["PendingImage | torch.Tensor"]], raw: bool = False):
    """Pad the vision inputs of a batch to one tensor, bottom/right, HF's layout.

    Each input is a ``PendingImage`` (normalised straight into its slot) or a float ``[3, h, w]``
    tensor (copied as is). With ``raw``, pixel_values keep the ``PendingImage``s' uint8 levels
    (4x fewer bytes to move between ranks and to the GPU); ``normalise_pixels`` on the device then
    gives the float values bit for bit, from the normaliser's ``as_tensor()`` returned as ``norm``.

    Returns pixel_values [B, max_images, 3, H, W] float32 (uint8 with ``raw``; zeros in padding),
    pixel_attention_mask [B, max_images, H, W] bool (True on real pixels),
    image_mask [B, max_images] bool (True for real images; padding images are never
    inferred from their pixels) and, with ``raw``, norm (float32, or None without images).
    With no image in the batch, max_images, H and W are 0.
    """
    batch = len(per_sample)
    max_images = max((len(s) for s in per_sample), default=0)
    sizes = [img.shape[-2:] for s in per_sample for img in s]
    height = max((h for h, _ in sizes), default=0)
    width = max((w for _, w in sizes), default=0)
    # numpy's zeros come from calloc: fresh zero pages, so only the bytes we write cost time,
    # where torch.zeros would first memset the whole (mostly overwritten) buffer.
    dtype = np.uint8 if raw else np.float32
    pixel_values = torch.from_numpy(np.zeros((batch, max_images, 3, height, width), dtype=dtype))
    pixel_mask = torch.from_numpy(np.zeros((batch, max_images, height, width), dtype=np.bool_))
    image_mask = torch.zeros(batch, max_images, dtype=torch.bool)
    values = pixel_values.numpy()  # the same memory, for numpy writers
    norm = None
    for b, images in enumerate(per_sample):
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            if raw:
                if not isinstance(img, PendingImage):
                    raise TypeError("raw pixel batches need the encoder's uint8 PendingImages, got a float tensor")
                values[b, i, :, :h, :w] = img.pixels.transpose(2, 0, 1)
                norm = img.normaliser
            elif isinstance(img, PendingImage):
                img.write_to(values[b, i, :, :h, :w])  # normalised straight into its slot
            else:
                pixel_values[b, i, :, :h, :w] = img
            pixel_mask[b, i, :h, :w] = True
            image_mask[b, i] = True
    if raw:
        return pixel_values, pixel_mask, image_mask, None if norm is None else norm.as_tensor()
    return pixel_values, pixel_mask, image_mask


def normalise_pixels(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                     norm: Optional[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixel_values of ``pad_images(raw=True)`` -> the float ones in ``dtype``, on their device.

    ``norm`` (``Normaliser.as_tensor``) holds the float32 ops the CPU normaliser checked against HF's
    numbers on all 256 levels, run here in the same order in float32 (IEEE float32 division and
    subtraction round the same on every device), or else its per-level table; the float32 result
    is then cast to ``dtype`` (the model's). Keep ``norm`` on the host: its op codes are read as
    Python numbers, which on a device tensor would be a host sync. Padding stays 0, HF's layout.
    """
    if pixel_values.dtype != torch.uint8 or pixel_values.numel() == 0:
        return pixel_values.to(dtype)
    if norm is None:
        raise ValueError("uint8 pixel_values need their normalisation (pixel_norm)")
    device = pixel_values.device
    if norm.shape[-1] == 256:  # the table: one value per channel and level
        table = norm.to(device=device, dtype=torch.float32, non_blocking=True)
        channel = torch.arange(3, device=device).view(3, 1, 1) * 256
        values = torch.take(table.reshape(-1), pixel_values.long() + channel)
    else:
        values = pixel_values.float()
        for op, *per_channel in norm.tolist():
            value = torch.tensor(per_channel, dtype=torch.float32).view(3, 1, 1).to(device, non_blocking=True)
            values = values.div_(value) if int(op) == 1 else values.sub_(value)
    return values.masked_fill_(~pixel_attention_mask.bool().unsqueeze(2), 0.0).to(dtype)
