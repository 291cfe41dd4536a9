"""DataLoader worker -> main process transport: pickled through the pipe vs shared memory.

The training loader (``ResumableLoader`` with the training's encoder and ``Collator``, as
``build_train_valid_loaders`` builds them) runs over shards written by our own tool
(``toolkits/pretrain_data_preprocessing/build_webdataset.py``) from JPEG photos of 640-1280 px,
1-2 per sample, at Idefics2-8b's image settings (longest edge 980, shortest 378), with 2 workers,
unpacked and packed. Two transports alternate in every round, so a busy spell on a shared machine
slows both:

* ``pickle``: ``worker_wire=False``, what a worker returns goes to torch's ``ForkingPickler`` as
  it is (numpy arrays, e.g. the packed path's uint8 images, are pickled through the pipe; every
  tensor, however small, becomes a shared-memory segment);
* ``wire``: the default, ``worker_transport.to_wire``: arrays >= ``SHM_MIN_BYTES`` as tensors (shared
  memory), smaller tensors as numpy (the pipe); ``from_wire`` restores the types in the main process.

::

    python -m bench.bench_worker_transport                 # writes bench/results/worker_transport.json
    python -m bench.bench_worker_transport --samples 32 --rounds 2 --out /tmp/wt.json

Per mode and transport: samples/s (wall, whole pass over ``--samples`` including worker start-up),
main-process CPU ms per micro-batch and per sample (unpickling and fetching shared segments land
there: it is the trainer's CPU; packed, it also packs and collates), worker CPU ms per sample
(``RUSAGE_CHILDREN``), best of ``--rounds``. Also what one worker return value holds (the type of
every leaf, by path), what it costs to send (bytes pickled into the pipe, number and bytes of
shared-memory segments), and the transport alone: the first ``--transport-items`` real return
values replayed through a 2-worker DataLoader that does nothing else (items/s, main CPU ms/item).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron_patch.data import loader as loader_mod
from megatron_patch.data import worker_transport as transport
from megatron_patch.data.collate import Collator
from megatron_patch.data.encoder import encoder_from_settings
from megatron_patch.data.image_processing import PendingImage
from megatron_patch.data.settings import DataSettings
from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the a of and to in is on with for that this image shows person red blue green small large table "
         "window street car dog cat tree building sky people holding wearing standing next near left right").split()


def build_shards(root: Path, n: int, seed: int = 0) -> Path:
    """n LLaVA records with 1-2 JPEG photos (smooth shapes + noise) each, sharded by our tool."""
    from toolkits.pretrain_data_preprocessing import build_webdataset

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        names = []
        for j in range(int(rng.integers(1, 3))):
            w, h = int(rng.integers(640, 1281)), int(rng.integers(480, 1025))
            small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.int16)
            img = np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"{i}_{j}.jpg", quality=90)
            names.append(f"{i}_{j}.jpg")
        answer = " ".join(rng.choice(WORDS, int(rng.integers(20, 200))))
        records.append({"id": str(i), "image": names, "conversations": [
            {"from": "human", "value": "<image>\n" * len(names) + "Describe the picture."},
            {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(records))
    build_webdataset.main(["--input", str(root / "data.json"), "--image-folder", str(root / "images"),
                           "--output-dir", str(root / "shards"), "--samples-per-shard", "32",
                           "--workers", "1", "--no-progress"])
    return root / "shards"


class _CountingPickler(pickle.Pickler):
    """Pickles like ForkingPickler would, but counts tensor storages (shared memory) instead of sending them."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.segments = {}

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            self.segments[storage.data_ptr()] = storage.nbytes()
            return tuple, ((),)  # a handle of a few bytes stands in for the storage
        return NotImplemented


def transport_cost(item) -> dict:
    buf = io.BytesIO()
    pickler = _CountingPickler(buf)
    pickler.dump(item)
    return {"pipe_bytes": buf.tell(), "shm_segments": len(pickler.segments),
            "shm_bytes": sum(pickler.segments.values())}


def leaf_types(obj, path="", out=None) -> dict:
    """{path with list indices as []: {"type", "count", "bytes"}} over dicts, lists, tuples, PendingImages."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            leaf_types(v, f"{path}.{k}" if path else str(k), out)
        return out
    if isinstance(obj, (list, tuple)):
        for v in obj:
            leaf_types(v, f"{path}[]", out)
        return out
    if isinstance(obj, PendingImage):
        return leaf_types(obj.pixels, f"{path}<PendingImage>.pixels", out)
    if isinstance(obj, (transport._SharedArray, transport._PipedTensor)):
        inner = obj.tensor if isinstance(obj, transport._SharedArray) else obj.array
        return leaf_types(inner, f"{path}<{type(obj).__name__}>", out)
    if isinstance(obj, torch.Tensor):
        name, size = f"torch.Tensor {str(obj.dtype).removeprefix('torch.')}", obj.nbytes
    elif isinstance(obj, np.ndarray):
        name, size = f"numpy.ndarray {obj.dtype}", obj.nbytes
    else:
        name, size = type(obj).__name__, 0
    entry = out.setdefault(path, {"type": name, "count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
    return out


def make_loader(shards, encoder, collator, args, packed: bool, wire: bool):
    return loader_mod.ResumableLoader(
        [shards], encode=encoder, collate=collator, micro_batch_size=args.micro_batch_size, seed=1234,
        total_samples=args.samples, num_workers=args.num_workers,
        pack_seq_length=args.seq_length if packed else None, pack_buffer_size=args.pack_buffer_size,
        worker_wire=wire)


def one_pass(loader) -> dict:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = sum(1 for _ in loader)  # exhausting the iterator joins the workers
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    samples = loader.consumed_samples
    return {"samples_per_s": samples / wall, "main_cpu_ms_per_batch": cpu / batches * 1e3,
            "main_cpu_ms_per_sample": cpu / samples * 1e3, "worker_cpu_ms_per_sample": worker_cpu / samples * 1e3,
            "batches": batches}


class _Replay(torch.utils.data.Dataset):
    """Hands out real worker return values read beforehand (inherited by the forked workers), so a
    DataLoader pass over it costs the transport alone, free of the decode work that makes the
    loader's passes noisy."""

    def __init__(self, items: list, wire: bool, repeats: int):
        self.items, self.wire, self.repeats = items, wire, repeats

    def __len__(self):
        return len(self.items) * self.repeats

    def __getitem__(self, i):
        item = self.items[i % len(self.items)]
        return transport.to_wire(item) if self.wire else item


def replay_pass(items: list, wire: bool, workers: int, repeats: int = 8) -> dict:
    data = torch.utils.data.DataLoader(_Replay(items, wire, repeats), batch_size=None, num_workers=workers,
                                       collate_fn=lambda x: x)
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    for item in data:
        if wire:
            item = transport.from_wire(item)
        n += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"items_per_s": n / wall, "main_cpu_ms_per_item": cpu / n * 1e3}


def inspect(shards, encoder, collator, args, packed: bool) -> dict:
    """What the first sampler item's worker return value holds, raw and through ``to_wire``, and the
    transport alone (``_Replay``) over the first ``--transport-items`` items, best of 3 x ``--rounds``."""
    loader = make_loader(shards, encoder, collator, args, packed, wire=True)
    sampler = iter(loader._sampler())
    items = [loader.reader.read(next(sampler)) for _ in range(args.transport_items)]
    raw, wired = items[0], transport.to_wire(items[0])
    replays = defaultdict(list)
    for _ in range(args.rounds * 3):
        for kind in ("pickle", "wire"):
            replays[kind].append(replay_pass(items, kind == "wire", args.num_workers))
    replayed = {t: {"items_per_s": round(max(r["items_per_s"] for r in rs), 1),
                     "main_cpu_ms_per_item": round(min(r["main_cpu_ms_per_item"] for r in rs), 3)}
                 for t, rs in replays.items()}
    return {"leaves_pickle": leaf_types(raw), "leaves_wire": leaf_types(wired),
            "cost_pickle": transport_cost(raw), "cost_wire": transport_cost(wired),
            "transport_pickle": replayed["pickle"], "transport_wire": replayed["wire"],
            "transport_wire_over_pickle_per_round": [round(b["items_per_s"] / a["items_per_s"], 2)
                                                     for a, b in zip(replays["pickle"], replays["wire"])]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--pack-buffer-size", type=int, default=16, help="small: packed batches flow within --samples")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--transport-items", type=int, default=6, help="worker return values timed alone")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "worker_transport.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(Path(tmp), args.samples)
        tok_dir = build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), Path(tmp) / "tok")
        settings = DataSettings(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, image_size=980,
                                shortest_edge=378, image_splitting=False)
        encoder = encoder_from_settings(settings, tok_dir)
        collator = Collator(args.seq_length, encoder.pad_token_id)
        results = {
            "benchmark": "worker_transport", "samples": args.samples, "micro_batch_size": args.micro_batch_size,
            "seq_length": args.seq_length, "num_workers": args.num_workers, "pack_buffer_size": args.pack_buffer_size,
            "images": "640-1280 x 480-1024 px JPEG, 1-2 per sample; longest edge 980, shortest 378",
            "shm_min_bytes": transport.SHM_MIN_BYTES, "rounds": args.rounds,
            "sharing_strategy": torch.multiprocessing.get_sharing_strategy(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            "python": platform.python_version(), "torch": torch.__version__, "modes": {}}
        for mode in ("unpacked", "packed"):
            packed = mode == "packed"
            info = inspect(shards, encoder, collator, args, packed)
            runs = defaultdict(list)
            for _ in range(args.rounds):
                for kind in ("pickle", "wire"):
                    runs[kind].append(one_pass(make_loader(shards, encoder, collator, args, packed,
                                                           kind == "wire")))
            best = {t: {"samples_per_s": round(max(r["samples_per_s"] for r in rs), 2),
                        "main_cpu_ms_per_batch": round(min(r["main_cpu_ms_per_batch"] for r in rs), 2),
                        "main_cpu_ms_per_sample": round(min(r["main_cpu_ms_per_sample"] for r in rs), 2),
                        "worker_cpu_ms_per_sample": round(min(r["worker_cpu_ms_per_sample"] for r in rs), 2),
                        "batches": rs[0]["batches"]} for t, rs in runs.items()}
            p, w = best["pickle"], best["wire"]
            results["modes"][mode] = {
                "best": best,
                "wire_over_pickle_samples_per_s": round(w["samples_per_s"] / p["samples_per_s"], 2),
                "wire_over_pickle_per_round": [round(b["samples_per_s"] / a["samples_per_s"], 2)
                                               for a, b in zip(runs["pickle"], runs["wire"])],
                "pickle_over_wire_main_cpu": round(p["main_cpu_ms_per_batch"] / w["main_cpu_ms_per_batch"], 2),
                "transport_wire_over_pickle_items_per_s": round(info["transport_wire"]["items_per_s"]
                                                                / info["transport_pickle"]["items_per_s"], 2),
                "transport_pickle_over_wire_main_cpu": round(info["transport_pickle"]["main_cpu_ms_per_item"]
                                                             / info["transport_wire"]["main_cpu_ms_per_item"], 2),
                "pickle_over_wire_worker_cpu": round(p["worker_cpu_ms_per_sample"] / w["worker_cpu_ms_per_sample"], 2),
                "rounds": {t: [{k: round(v, 2) for k, v in r.items()} for r in rs] for t, rs in runs.items()},
                **info}
            print(f"{mode}: samples/s pickle {p['samples_per_s']:.2f} wire {w['samples_per_s']:.2f} "
                  f"(x{w['samples_per_s'] / p['samples_per_s']:.2f}); main CPU ms/batch "
                  f"{p['main_cpu_ms_per_batch']:.1f} -> {w['main_cpu_ms_per_batch']:.1f}; pipe bytes/item "
                  f"{info['cost_pickle']['pipe_bytes']} -> {info['cost_wire']['pipe_bytes']}; transport alone items/s "
                  f"{info['transport_pickle']['items_per_s']} -> {info['transport_wire']['items_per_s']}, main CPU "
                  f"ms/item {info['transport_pickle']['main_cpu_ms_per_item']} -> "
                  f"{info['transport_wire']['main_cpu_ms_per_item']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
