"""Write a small synthetic captioning set (LLaVA JSON + PNG images) that a tiny model can learn on CPU.

    python examples/idefics2/make_shapes_dataset.py --output-dir runs/shapes [--train 300] [--valid 40] \\
        [--image-size 56] [--seed 0]

Each image is one filled shape (circle, square or triangle) in one of six colours on a plain
background of a different colour, drawn big and near the centre; its caption names exactly that::

    DIR/images/train/000000.png, DIR/images/valid/000000.png, ...
    DIR/train.json, DIR/valid.json
        [{"id": "shapes-train-000000", "image": "train/000000.png",
          "conversations": [{"from": "human", "value": "<image>\\nDescribe the image."},
                            {"from": "gpt", "value": "a red circle on a blue background"}]}, ...]

Image paths are relative to DIR/images (pass it as --image-folder). Train and valid records have
disjoint ids and images; they may share (shape, colour, background) combinations, which is what a
caption task should generalise over. Output is a pure function of the flags (reruns are
byte-identical; files already there are overwritten). The shape's centre pixel is always the shape
colour and the image corners always the background; shapes are drawn without anti-aliasing, so
every pixel is exactly one of the two named colours. Score a model on it with
`toolkits/eval/generate_and_score.py --data DIR/valid.json --image-folder DIR/images ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw

PROMPT = "<image>\nDescribe the image."
CAPTION = "a {colour} {shape} on a {background} background"
SHAPES = ("circle", "square", "triangle")
# Far apart in RGB so they stay distinct after resizing; names start with a consonant so the
# fixed template's "a" is always right.
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 40), "purple": (140, 50, 170), "white": (245, 245, 245),
}
MIN_IMAGE_SIZE = 16


def draw_shape(size: int, shape: str, colour, background, rng: random.Random) -> Image.Image:
    """One shape with radius 30-36% of the image, centre jittered by at most 6%: the centre pixel
    stays inside the shape and the corners stay outside it (for all three shapes)."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.30, 0.36)
    jitter = size * 0.06
    cx = size / 2 + rng.uniform(-jitter, jitter)
    cy = size / 2 + rng.uniform(-jitter, jitter)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        h = r * 0.85  # same area feel as the circle; corners at most 0.37 * size from the centre
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    else:  # upward equilateral triangle with centroid at (cx, cy): its inradius r/2 covers the centre
        draw.polygon([(cx, cy - r), (cx - 0.866 * r, cy + r / 2), (cx + 0.866 * r, cy + r / 2)], fill=colour)
    return image


def make_split(out_dir: str, split: str, count: int, size: int, seed: int) -> list[dict]:
    """Draw ``count`` images of ``split``; its own RNG stream, so --train does not change valid."""
    rng = random.Random(f"shapes:{seed}:{split}")
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(count):
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(names, 2)
        image = draw_shape(size, shape, COLOURS[colour], COLOURS[background], rng)
        rel = f"{split}/{i:06d}.png"
        image.save(os.path.join(out_dir, "images", rel), format="PNG")
        caption = CAPTION.format(colour=colour, shape=shape, background=background)
        records.append({"id": f"shapes-{split}-{i:06d}", "image": rel,
                        "conversations": [{"from": "human", "value": PROMPT},
                                          {"from": "gpt", "value": caption}]})
    with open(os.path.join(out_dir, f"{split}.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_shapes_dataset", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--train", type=int, default=300, help="training records")
    p.add_argument("--valid", type=int, default=40, help="held-out records")
    p.add_argument("--image-size", type=int, default=56, help="image width = height in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("train", "valid"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.image_size < MIN_IMAGE_SIZE:
        p.error(f"--image-size must be >= {MIN_IMAGE_SIZE}, got {args.image_size}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output-dir {args.output_dir} is a file, not a folder")
    for split, count in (("train", args.train), ("valid", args.valid)):
        make_split(args.output_dir, split, count, args.image_size, args.seed)
    print(f"make_shapes_dataset: wrote {args.train} train + {args.valid} valid records "
          f"({len(SHAPES)} shapes x {len(COLOURS)} colours, {args.image_size}px) to {args.output_dir} "
          f"(images under {os.path.join(args.output_dir, 'images')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
