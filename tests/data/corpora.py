"""Helpers of the data tests: generated images, small LLaVA corpora, shards built by our tool."""
import json
import os

import numpy as np
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOLKIT = os.path.join(REPO, "toolkits", "pretrain_data_preprocessing")


def make_image(path, size=(16, 12), seed=0, fmt=None):
    """Write a small random RGB image; format from the extension unless ``fmt`` is given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def llava_record(rid, images=(), question="Describe.", answer="An image."):
    """A valid LLaVA record whose first human turn carries one <image> per image."""
    images = list(images)
    rec = {"id": rid,
           "conversations": [{"from": "human", "value": "<image>\n" * len(images) + question},
                             {"from": "gpt", "value": answer}]}
    if len(images) == 1:
        rec["image"] = images[0]
    elif images:
        rec["image"] = images
    return rec


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def build(input_path, image_folder, out_dir, samples_per_shard=4, workers=1, extra=()):
    """Run build_webdataset.py in-process; return report.json as a dict."""
    from toolkits.pretrain_data_preprocessing import build_webdataset

    argv = ["--input", str(input_path), "--image-folder", str(image_folder), "--output-dir",
            str(out_dir), "--samples-per-shard", str(samples_per_shard), "--workers", str(workers),
            "--no-progress", *extra]
    build_webdataset.main(argv)
    with open(os.path.join(out_dir, "report.json")) as f:
        return json.load(f)


def good_corpus(root, name, n, images_per_record=(0, 1, 2)):
    """Corpus of ``n`` valid LLaVA records (ids NAME-i) cycling through image counts."""
    img_dir = os.path.join(root, f"{name}_images")
    os.makedirs(img_dir, exist_ok=True)
    records = []
    for i in range(n):
        k = images_per_record[i % len(images_per_record)]
        paths = []
        for j in range(k):
            ext = "png" if (i + j) % 2 else "jpg"
            rel = f"sub/{name}_{i}_{j}.{ext}"
            make_image(os.path.join(img_dir, rel), size=(8 + i % 5, 6 + j), seed=i * 10 + j)
            paths.append(rel)
        records.append(llava_record(f"{name}-{i}", paths, question=f"q{i}", answer=f"a{i}"))
    input_path = write_jsonl(os.path.join(root, f"{name}.jsonl"), records)
    return input_path, img_dir
