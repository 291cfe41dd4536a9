"""Data pipeline throughput: webdataset shard -> decode -> Idefics2 processing -> tokens/labels -> batch.

Ours (``SampleEncoder`` + ``Collator``) and transformers' ``Idefics2Processor`` (built offline from
``Idefics2ImageProcessor`` + the same tokenizer, the usual fine-tuning collate) run side by side, in
one process on one thread, over the same samples read from the same tar. The tar is written here
with ``webdataset.TarWriter`` in the project's shard layout (KEY.json + KEY.0.jpg ...), with
generated JPEGs of 300-1200 px a side and LLaVA-like conversations.

    python -m bench.bench_data                      # writes bench/results/data.json and prints it
    python -m bench.bench_data --samples 48 --repeats 2 --out /tmp/data.json

Figures are samples/s on one CPU core (``torch.set_num_threads(1)``), best of ``--repeats`` whole
passes over the shard, including reading and JPEG decoding, which both pay equally. Each is taken
twice: per second of wall clock and per second of this process's CPU time (``process_time``;
steadier when other processes share the cores). Per config, four passes alternate in every round,
so load from other processes hits all of them: ours, HF's, read + decode only, and read + decode +
the PIL crop/resize both pipelines must do (``Idefics2ImageTransform.resized_crops``). The last
bounds any bit-exact pipeline: ``ceiling_speedup`` = HF's time / that time. The speed-up of every
round is recorded next to the best-vs-best one.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron_patch.data.chat import content_parts
from megatron_patch.data.collate import Collator
from megatron_patch.data.encoder import SampleEncoder
from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path

WORDS = ("the a of and to in is on with for that this image shows person red blue green small large table "
         "window street car dog cat tree building sky people holding wearing standing next near left right "
         "background front two three several white black wooden old young sign text reads").split()


def _photo(rng, width, height) -> bytes:
    """A JPEG with smooth gradients, shapes and sensor-like noise (decodes like a photo would)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + rng.integers(20, 200), x0:x0 + rng.integers(20, 200)] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sentence(rng, lo, hi) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi))).capitalize() + "."


def write_shard(path: Path, n: int, seed: int) -> None:
    """n samples: 1-2 images each, 1-2 question/answer turns."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        for i in range(n):
            n_img = int(rng.integers(1, 3))
            messages = [{"role": "user", "content": "<image>\n" * n_img + _sentence(rng, 8, 30)},
                        {"role": "assistant", "content": " ".join(_sentence(rng, 8, 25) for _ in range(rng.integers(2, 6)))}]
            if rng.random() < 0.5:
                messages += [{"role": "user", "content": _sentence(rng, 5, 15)},
                             {"role": "assistant", "content": _sentence(rng, 10, 40)}]
            key = f"{i:06d}"
            sample = {"__key__": key}
            record = {"id": key, "images": [f"{key}.{j}.jpg" for j in range(n_img)], "messages": messages}
            sample["json"] = json.dumps(record).encode()
            for j in range(n_img):
                sample[f"{j}.jpg"] = _photo(rng, int(rng.integers(300, 1201)), int(rng.integers(300, 1201)))
            sink.write(sample)


def read_shard(path: Path):
    """(record, decoded PIL images) per sample, the way the training loader reads them."""
    import webdataset as wds

    for sample in wds.WebDataset(str(path), shardshuffle=False):
        record = json.loads(sample["json"])
        images = []
        for j in range(len(record["images"])):
            image = Image.open(io.BytesIO(sample[f"{j}.jpg"]))
            image.load()
            images.append(image)
        yield record, images


def _batches(path: Path, size: int):
    batch = []
    for item in read_shard(path):
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_decode_only(path, size):
    return sum(len(b) for b in _batches(path, size))


def run_decode_resize(path, size, transform):
    """Read + decode + the crops/resizes (PIL, identical in both pipelines): a floor for either."""
    n = 0
    for items in _batches(path, size):
        for _, images in items:
            for image in images:
                transform.resized_crops(image)
        n += len(items)
    return n


def run_ours(path, size, encoder: SampleEncoder, collator: Collator):
    n = 0
    for items in _batches(path, size):
        batch = collator([encoder.encode(record, images) for record, images in items])
        n += batch["tokens"].shape[0]
    return n


def run_hf(path, size, processor, seq_length):
    """The usual HF collate: chat template, processor call, labels = ids with pad/image tokens at -100."""
    tok = processor.tokenizer
    never = torch.tensor([tok.pad_token_id, tok.convert_tokens_to_ids("<image>"),
                          tok.convert_tokens_to_ids("<fake_token_around_image>")])
    n = 0
    for items in _batches(path, size):
        texts = [processor.apply_chat_template([{"role": m["role"], "content": content_parts(m["content"])}
                                                for m in record["messages"]], tokenize=False) for record, _ in items]
        batch = processor(text=texts, images=[images for _, images in items], padding="max_length",
                          max_length=seq_length, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[torch.isin(labels, never)] = -100
        batch["labels"] = labels
        n += labels.shape[0]
    return n


def timed_passes(passes: dict, repeats: int) -> dict:
    """{name: {"wall": [samples/s per round], "cpu": [...]}} after one warm-up pass of each.

    The passes alternate (a, b, c, a, b, c, ...) so that a busy spell on a shared machine slows
    all of them rather than one.
    """
    for fn in passes.values():
        fn()
    rates = {name: {"wall": [], "cpu": []} for name in passes}
    for _ in range(repeats):
        for name, fn in passes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            n = fn()
            rates[name]["wall"].append(n / (time.perf_counter() - wall))
            rates[name]["cpu"].append(n / max(time.process_time() - cpu, 1e-9))
    return rates


def summarise(rates: dict, clock: str) -> dict:
    """Best-of figures and per-round speed-ups on one clock ("wall" or "cpu")."""
    best = {name: max(r[clock]) for name, r in rates.items()}
    ours, hf, decode = best["ours"], best["hf"], best["read_decode"]
    # Reading + decoding costs both the same; what each spends beyond it is its processing.
    processing = (1 / hf - 1 / decode) / max(1 / ours - 1 / decode, 1e-9)
    rounds = [o / h for o, h in zip(rates["ours"][clock], rates["hf"][clock])]
    floor = best["read_decode_resize"]
    ms = lambda rate: 1000 / rate  # noqa: E731
    return {
        "ours_samples_per_s": round(ours, 2), "hf_samples_per_s": round(hf, 2),
        "speedup": round(ours / hf, 2), "speedup_per_round": [round(r, 2) for r in rounds],
        "speedup_excluding_read_decode": round(processing, 2),
        "read_decode_samples_per_s": round(decode, 2),
        "read_decode_resize_samples_per_s": round(floor, 2),
        "ceiling_speedup": round(floor / hf, 2),
        "ms_per_sample": {  # where the time goes, from the best passes
            "read_decode": round(ms(decode), 2), "crop_resize": round(ms(floor) - ms(decode), 2),
            "ours_beyond_resize": round(ms(ours) - ms(floor), 2), "hf_beyond_resize": round(ms(hf) - ms(floor), 2),
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=378, help="longest edge")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoTokenizer, Idefics2ImageProcessor, Idefics2Processor

    results = {"benchmark": "data_pipeline", "samples": args.samples, "micro_batch_size": args.micro_batch_size,
               "seq_length": args.seq_length, "image_sizes": "300-1200 px JPEG, 1-2 per sample",
               "threads": 1, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
               "python": platform.python_version(), "torch": torch.__version__, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), Path(tmp) / "tok")
        shard = Path(tmp) / "shard-000000.tar"
        write_shard(shard, args.samples, args.seed)
        configs = [  # (name, longest_edge, shortest_edge or None for our default, image splitting)
            ("default_whole_image", args.image_size, None, False),
            ("default_image_splitting", args.image_size, None, True),
            ("idefics2_8b_sizes_980_378", 980, 378, False),  # the released model's size settings
        ]
        for name, longest, shortest, splitting in configs:
            encoder = SampleEncoder(tok_dir, args.seq_length, longest_edge=longest, shortest_edge=shortest,
                                    image_splitting=splitting)
            collator = Collator(args.seq_length, encoder.pad_token_id)
            image_processor = Idefics2ImageProcessor(**encoder.image_config.hf_kwargs())
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            tokenizer.padding_side = "right"
            processor = Idefics2Processor(image_processor, tokenizer, image_seq_len=encoder.image_seq_len,
                                          chat_template=tokenizer.chat_template)
            mbs = args.micro_batch_size
            rates = timed_passes({
                "ours": lambda: run_ours(shard, mbs, encoder, collator),
                "hf": lambda: run_hf(shard, mbs, processor, args.seq_length),
                "read_decode": lambda: run_decode_only(shard, mbs),
                "read_decode_resize": lambda: run_decode_resize(shard, mbs, encoder.transform),
            }, args.repeats)
            cpu, wall = summarise(rates, "cpu"), summarise(rates, "wall")
            results["configs"][name] = {
                "cpu_time": cpu, "wall_clock": wall, "image_splitting": splitting,
                "hf_image_processor": type(image_processor).__name__,
                "longest_edge": encoder.image_config.longest_edge, "shortest_edge": encoder.image_config.shortest_edge,
            }
            print(f"{name}: per CPU-second ours {cpu['ours_samples_per_s']:.1f}, HF {cpu['hf_samples_per_s']:.1f}, "
                  f"x{cpu['speedup']:.2f} (ceiling x{cpu['ceiling_speedup']:.2f}); wall x{wall['speedup']:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
