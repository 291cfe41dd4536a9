"""Data loading CPU per sample on one 8-rank node, against the tensor-parallel size.

Before: every rank ran its own loader (each TP rank and pipeline stage decoded the same images).
Now: only TP rank 0 of the first stage reads, decodes and encodes; the others receive tensors
(`megatron_patch/training/batch_transport.py`). For TP in 1, 2, 4, 8 on 8 gloo ranks (DP = 8 / TP),
both modes fetch the same micro-batches; the CPU time of all 8 ranks together (loading and
sending/receiving) is divided by the samples trained on. Ideal: the "before" figure grows with TP,
"now" stays flat, so their ratio is TP.

Order section (`--only order`, seconds, one process): memory and lookup cost of the global
sample order (`megatron_patch/data/sampler.py`) at L = 10^6 and 10^9 samples per epoch, against
the previous implementation (epoch-sized arrays, loaded from `git show HEAD:...`) at 10^6 and
10^7. It goes under the key "order" of the same JSON.

    python -m bench.bench_data_scale                  # both sections -> bench/results/data_scale.json
    python -m bench.bench_data_scale --only tp        # the TP section only
    python -m bench.bench_data_scale --only order     # the order section only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _photo_shards(root: Path, width: int, height: int, n: int = 96) -> Path:
    """Shards of JPEG photos-sized images (smooth noise) with one caption each, built by our tool."""
    import numpy as np
    from PIL import Image

    from toolkits.pretrain_data_preprocessing import build_webdataset

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(root / "images" / f"{i}.jpg", quality=90)
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a smooth colourful blur"}]})
    (root / "data.json").write_text(json.dumps(records))
    build_webdataset.main(["--input", str(root / "data.json"), "--image-folder", str(root / "images"),
                           "--output-dir", str(root / "shards"), "--workers", "1", "--no-progress"])
    return root / "shards"


def _cpu_per_sample(ctx, steps: int, every_rank_loads: bool) -> float:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch.training import batch_transport, build
    from megatron_patch.training.micro_batches import model_inputs

    def fetch(data):
        """One micro-batch as the forward step gets it (training/micro_batches.py), pixels finished in fp32."""
        raw = next(data) if data is not None else None
        part = raw if every_rank_loads else batch_transport.tensor_hop(raw, ctx.device)
        return model_inputs(part, torch.float32, ctx.hf_config.vision_config.patch_size)

    loads = batch_transport.loads_data
    if every_rank_loads:  # the former behaviour: a loader on every rank, no transport
        batch_transport.loads_data = build.loads_data = lambda: True
    try:
        build.build_data(ctx)
        data = iter(ctx.train_loader) if ctx.train_loader is not None else None
        fetch(data)  # warm-up: tokenizer, first shard reads
        start = time.process_time()
        for _ in range(steps):
            fetch(data)
        used = torch.tensor([time.process_time() - start], dtype=torch.float64)
    finally:
        batch_transport.loads_data = build.loads_data = loads
        ctx.train_loader = None
    dist.all_reduce(used)
    samples = steps * ctx.args.micro_batch_size * ps.get_data_parallel_world_size()
    return float(used) / samples


def _rank_main(flags: list, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_patch.platform import init_distributed
    from megatron_patch.platform.distributed import get_device
    from megatron_patch.training.arguments import parse_args
    from types import SimpleNamespace

    torch.set_num_threads(1)
    rows = []
    args = parse_args(flags)  # validated at TP1: the tiny model's heads do not split 8 ways, the data path needs no model
    for tp in (1, 2, 4, 8):
        init_distributed(tp, 1, seed=args.seed)
        # What build_data reads of a TrainingContext (no model: the data path alone), a fresh run's state.
        ctx = SimpleNamespace(args=args, hf_config=args.hf_config, device=get_device(), train_loader=None,
                              valid_loader=None, state=SimpleNamespace(consumed_samples=0),
                              resumed=SimpleNamespace(loader_state=None))
        before = _cpu_per_sample(ctx, steps, every_rank_loads=True)
        now = _cpu_per_sample(ctx, steps, every_rank_loads=False)
        rows.append({"tp": tp, "dp": 8 // tp, "cpu_ms_per_sample_before": round(before * 1e3, 2),
                     "cpu_ms_per_sample_now": round(now * 1e3, 2), "before_over_now": round(before / now, 2)})
    if dist.get_rank() == 0:
        result = {"ranks": 8, "steps": steps, "micro_batch_size": args.micro_batch_size, "rows": rows}
        _write_merged(out, result)
        print(json.dumps(result, indent=2))


def _write_merged(out: str, part: dict) -> None:
    """Update the JSON at ``out`` with ``part``'s keys: each section rewrites only its own."""
    path = Path(out)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


# ---- order section ----------------------------------------------------------------------------

def _previous_sampler():
    """The sampler module as committed at HEAD (the implementation to compare against), or None."""
    import importlib.util

    try:
        src = subprocess.run(["git", "show", "HEAD:megatron_patch/data/sampler.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"order: cannot read the previous sampler from git ({e}); comparison skipped")
        return None
    if "def epoch(" not in src:
        print("order: HEAD's sampler already is the on-demand one; comparison skipped")
        return None
    tmp = tempfile.NamedTemporaryFile("w", suffix="_previous_sampler.py", delete=False)
    tmp.write(src)
    tmp.close()
    spec = importlib.util.spec_from_file_location("previous_sampler", tmp.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(tmp.name)
    return module


def _measure_order(make_order, L: int, rounds: int, batch: int = 4096) -> dict:
    """tracemalloc peak of (construct + look up 1024 positions); time per position in batches."""
    import tracemalloc

    import numpy as np

    make_order(1000).lookup(np.arange(1024))  # numpy's one-time first-call allocations stay out
    tracemalloc.start()
    order = make_order(L)
    order.lookup(L // 2 + np.arange(1024))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del order
    order = make_order(L)  # timings without tracemalloc, cold first batch included separately
    times = []
    for r in range(rounds + 1):
        # Consecutive batches, as the sampler asks for them, spread over the first epoch.
        start = (L // (rounds + 2)) * (r + 1)
        t0 = time.perf_counter()
        order.lookup(start + np.arange(batch))
        times.append(time.perf_counter() - t0)
    return {"L": L, "peak_mib": round(peak / 2**20, 3), "bytes_per_sample": round(peak / L, 3),
            "first_batch_ms": round(times[0] * 1e3, 2),
            "us_per_position": round(float(np.median(times[1:])) / batch * 1e6, 3), "batch": batch}


def order_section(out: str, rounds: int = 5) -> dict:
    from megatron_patch.data import sampler

    def sizes(L):
        return [L // 3, L - L // 3]  # two datasets, unweighted

    result = {"datasets": "2, sizes L/3 and 2L/3, unweighted", "rounds": rounds, "now": [], "previous": []}
    for L in (10**6, 10**9):
        row = _measure_order(lambda L: sampler.GlobalOrder(sizes(L), seed=1), L, rounds)
        result["now"].append(row)
        print(f"order now       L={L:>13,}: peak {row['peak_mib']:8.3f} MiB, "
              f"{row['us_per_position']:.3f} us/position (first batch {row['first_batch_ms']} ms)", flush=True)
    previous = _previous_sampler()
    if previous is not None:
        for L in (10**6, 10**7):
            row = _measure_order(lambda L: previous.GlobalOrder(sizes(L), seed=1), L, rounds)
            result["previous"].append(row)
            print(f"order previous  L={L:>13,}: peak {row['peak_mib']:8.3f} MiB, "
                  f"{row['us_per_position']:.3f} us/position (first batch {row['first_batch_ms']} ms)", flush=True)
        # The previous order keeps (layout int32 + sample int64) = 12 bytes per slot per cached epoch.
        held, peak = 12 * 10**9, result["previous"][-1]["bytes_per_sample"] * 10**9
        result["previous_1e9_estimate"] = {"held_gib": round(held / 2**30, 1), "peak_gib": round(peak / 2**30, 1)}
        print(f"order previous  L=1,000,000,000: not measured: it would hold ~L x 12 bytes = "
              f"{held / 2**30:.1f} GiB per cached epoch (up to 2 cached) and peak near "
              f"{peak / 2**30:.1f} GiB while building one (measured bytes/sample at 10^7 x 10^9)")
    _write_merged(out, {"order": result})
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="micro-batches fetched per rank and mode")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "data_scale.json"))
    p.add_argument("--image-width", type=int, default=800)
    p.add_argument("--image-height", type=int, default=600)
    p.add_argument("--longest-edge", type=int, default=490, help="images resized to this (the encoder's --image-size)")
    p.add_argument("--only", choices=["tp", "order"], help="run one section (default: both)")
    p.add_argument("--rank-main", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main is not None:
        _rank_main(args.rank_main, args.steps, args.out)
        return
    if args.only != "tp":
        order_section(args.out)
    if args.only == "order":
        return
    from tests.training.fixtures import train_flags, training_inputs

    with tempfile.TemporaryDirectory() as tmp:
        shards = _photo_shards(Path(tmp), args.image_width, args.image_height)
        flags = train_flags(training_inputs(), Path(tmp) / "save", mbs=2, gbs=16)
        flags[flags.index("--data-path") + 1] = str(shards)
        flags += ["--image-size", str(args.longest_edge)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", __file__,
               "--steps", str(args.steps), "--out", args.out, "--rank-main", *flags]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
