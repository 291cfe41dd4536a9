"""Idefics2 image processing equals transformers' Idefics2ImageProcessor, bit for bit."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_patch.data.errors import SkipSample
from megatron_patch.data.image_processing import (
    Idefics2ImageTransform,
    ImageProcessingConfig,
    pad_images,
    resized_size,
)
from tests.data.encoder_fixtures import hf_image_processor, make_image

pytestmark = pytest.mark.unit


# Sizes chosen to hit every branch of the resize rule: landscape / portrait / square, larger and
# smaller than longest_edge, sides below shortest_edge, odd sizes for the split midpoints.
IMAGES = [
    ("RGB", 400, 300), ("RGBA", 120, 333), ("L", 17, 9), ("P", 241, 240), ("RGB", 96, 40),
    ("LA", 5, 150), ("CMYK", 33, 33), ("P_transparent", 64, 97), ("I;16", 50, 31), ("1", 20, 70),
]
GROUPS = [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9]]  # samples with 3, 1, 4 and 2 images


def _batch():
    images = [make_image(w, h, mode, seed=i) for i, (mode, w, h) in enumerate(IMAGES)]
    return [[images[i] for i in g] for g in GROUPS]


@pytest.mark.parametrize("splitting", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("edges", [(378, 14), (224, 100), (64, 64)], ids=lambda e: f"long{e[0]}-short{e[1]}")
def test_pixels_equal_transformers(splitting, edges):
    config = ImageProcessingConfig(longest_edge=edges[0], shortest_edge=edges[1], image_splitting=splitting)
    batch = _batch()
    ref = hf_image_processor(config)(batch, return_tensors="pt")
    transform = Idefics2ImageTransform(config)
    pixel_values, pixel_mask, image_mask = pad_images([transform(sample) for sample in batch])

    assert pixel_values.dtype == torch.float32 and pixel_mask.dtype == torch.bool
    assert pixel_values.shape == ref["pixel_values"].shape
    # Exact, not merely close: same PIL resize, and a look-up table built with HF's arithmetic.
    assert torch.equal(pixel_values, ref["pixel_values"])
    assert torch.equal(pixel_mask, ref["pixel_attention_mask"].bool())
    expected_counts = [len(g) * (5 if splitting else 1) for g in GROUPS]
    assert image_mask.sum(1).tolist() == expected_counts


CUSTOM_SETTINGS = [  # (settings, float32 passes the normaliser should pick; None = look-up table)
    (dict(), 2),  # Idefics2's: the fused x / 127.5 - 1
    (dict(image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711)), 3),
    (dict(rescale_factor=1 / 256), 2),
    (dict(rescale_factor=0.0039215), None),  # float32 ops differ from HF here: the table runs
    (dict(image_mean=(0.4, 0.4, 0.4), image_std=(0.3, 0.3, 0.3)), 3),
    (dict(do_normalize=False), 1),
]
SETTINGS_IDS = ["idefics2", "per-channel-norm", "rescale-1/256", "odd-rescale", "uniform-norm", "rescale-only"]


@pytest.mark.parametrize("settings,passes", CUSTOM_SETTINGS, ids=SETTINGS_IDS)
def test_custom_normalisation_equals_transformers(settings, passes):
    config = ImageProcessingConfig(longest_edge=50, **settings)
    transform = Idefics2ImageTransform(config)
    steps = transform.normaliser.steps
    assert (None if steps is None else len(steps)) == passes
    batch = _batch()
    ref = hf_image_processor(config)(batch, return_tensors="pt")
    pixel_values, _, _ = pad_images([transform(s) for s in batch])
    assert torch.equal(pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("settings,passes", CUSTOM_SETTINGS, ids=SETTINGS_IDS)
def test_every_uint8_level_equals_transformers(settings, passes):
    """All 256 levels in every channel, unresized: whichever arithmetic was picked is exact on each."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([levels, levels.T, 255 - levels], axis=-1))  # channels differ per pixel
    config = ImageProcessingConfig(longest_edge=16, shortest_edge=1, **settings)
    ref = hf_image_processor(config)([[image]], return_tensors="pt")["pixel_values"][0, 0]
    pending = Idefics2ImageTransform(config)([image])[0]
    assert pending.pixels.dtype == np.uint8 and pending.shape == ref.shape
    assert torch.equal(pending.tensor(), ref)


def test_black_image_is_still_a_real_image():
    """Padding images are marked by image_mask, never guessed from all-zero pixels."""
    config = ImageProcessingConfig(longest_edge=32, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    black = make_image(20, 10, "L").point(lambda _: 0)
    pixel_values, pixel_mask, image_mask = pad_images([Idefics2ImageTransform(config)([black]), []])
    assert pixel_values.abs().sum() == 0
    assert image_mask.tolist() == [[True], [False]]
    assert pixel_mask[0, 0].all() and not pixel_mask[1].any()


def test_no_images_in_batch():
    pixel_values, pixel_mask, image_mask = pad_images([[], []])
    assert pixel_values.shape == (2, 0, 3, 0, 0) and pixel_mask.shape == (2, 0, 0, 0) and image_mask.shape == (2, 0)


@pytest.mark.parametrize("hw,expected", [
    ((300, 400), (283, 378)),   # landscape shrinks to the longest edge
    ((400, 300), (378, 283)),   # portrait
    ((378, 378), (378, 378)),   # already fits
    ((100, 5), (100, 14)),      # a side below shortest_edge is raised (HF's rule)
    ((2000, 20), (378, 14)),
])
def test_resized_size(hw, expected):
    assert resized_size(*hw, longest_edge=378, shortest_edge=14) == expected


def test_one_pixel_wide_image_cannot_be_split():
    transform = Idefics2ImageTransform(ImageProcessingConfig(image_splitting=True))
    with pytest.raises(SkipSample) as err:
        transform([make_image(1, 40)], where="sample x: ")
    assert err.value.reason == "image_too_small" and "sample x" in str(err.value)


def test_settings_read_from_saved_preprocessor_config(tmp_path):
    saved = ImageProcessingConfig(longest_edge=980, shortest_edge=378, image_splitting=True,
                                  image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    hf_image_processor(saved).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["do_image_splitting"] is True
    assert ImageProcessingConfig.from_preprocessor_config(tmp_path) == saved
    overridden = ImageProcessingConfig.from_preprocessor_config(tmp_path, longest_edge=448, image_splitting=None)
    assert overridden.longest_edge == 448 and overridden.image_splitting is True


def test_bad_settings_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="unknown image processing setting"):
        ImageProcessingConfig().with_overrides(longest=3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 224}}))
    with pytest.raises(ValueError, match="longest_edge/shortest_edge"):
        ImageProcessingConfig.from_preprocessor_config(tmp_path)


# Our one deliberate departure from a default Idefics2ImageProcessor is the size (our 378-px longest
# edge and one-patch shortest edge, which keeps aspect ratios: see DEFAULT_SHORTEST_EDGE in
# image_processing.py); a model's saved settings replace it. Every other default is Idefics2's own.
OWN_DEFAULTS = {"size"}


def _comparable(value):
    return tuple(float(x) for x in value) if isinstance(value, (list, tuple)) else value


def test_defaults_are_those_of_a_default_transformers_processor():
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    reference = Idefics2ImageProcessorPil()  # transformers' defaults, nothing of ours passed in
    theirs = {k: v for k, v in reference.to_dict().items() if k != "image_processor_type"}
    ours = ImageProcessingConfig().hf_kwargs()
    assert set(theirs) <= set(ours), f"settings we do not carry: {sorted(set(theirs) - set(ours))}"
    assert {"image_mean", "image_std", "rescale_factor", "do_image_splitting", "resample"} <= set(theirs)
    differ = {k: (ours[k], theirs[k]) for k in theirs if _comparable(ours[k]) != _comparable(theirs[k])}
    assert set(differ) <= OWN_DEFAULTS, differ
    # The same pixels as the default processor once the size is its own too.
    size = reference.size
    config = ImageProcessingConfig().with_overrides(longest_edge=size["longest_edge"], shortest_edge=size["shortest_edge"])
    batch = [[make_image(400, 300, "RGB", seed=0)], [make_image(120, 333, "RGBA", seed=1)]]
    pixel_values, _, _ = pad_images([Idefics2ImageTransform(config)(sample) for sample in batch])
    assert torch.equal(pixel_values, reference(batch, return_tensors="pt")["pixel_values"])
