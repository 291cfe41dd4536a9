"""Data loading CPU per sample on one 8-rank node, against the tensor-parallel size.

Before: every rank ran its own loader (each TP rank and pipeline stage decoded the same images).
Now: only TP rank 0 of the first stage reads, decodes and encodes; the others receive tensors
(`megatron_patch/training/batch_transport.py`). For TP in 1, 2, 4, 8 on 8 gloo ranks (DP = 8 / TP),
both modes fetch the same micro-batches; the CPU time of all 8 ranks together (loading and
sending/receiving) is divided by the samples trained on. Ideal: the "before" figure grows with TP,
"now" stays flat, so their ratio is TP.

    python bench/bench_data_scale.py                  # writes bench/results/data_scale.json
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
sys.path.insert(0, str(REPO))


def _photo_shards(root: Path, width: int, height: int, n: int = 96) -> Path:
    """Shards of JPEG photos-sized images (smooth noise) with one caption each, built by our tool."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "toolkits" / "pretrain_data_preprocessing"))
    import build_webdataset

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

    from megatron_patch.training import batch_transport, build, loop

    loads = batch_transport.loads_data
    if every_rank_loads:  # the former behaviour: a loader on every rank, no transport
        batch_transport.loads_data = build.loads_data = lambda: True
        loop.distribute = lambda raw, device: {k: v for k, v in raw.items() if torch.is_tensor(v)}
    try:
        build.build_data(ctx)
        data = iter(ctx.train_loader) if ctx.train_loader is not None else None
        loop.next_batches(ctx, data, 1)  # warm-up: tokenizer, first shard reads
        start = time.process_time()
        for _ in range(steps):
            loop.next_batches(ctx, data, 1)
        used = torch.tensor([time.process_time() - start], dtype=torch.float64)
    finally:
        batch_transport.loads_data = build.loads_data = loads
        loop.distribute = batch_transport.distribute
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
    from megatron_patch.training.build import TrainingContext

    torch.set_num_threads(1)
    rows = []
    args = parse_args(flags)  # validated at TP1: the tiny model's heads do not split 8 ways, the data path needs no model
    for tp in (1, 2, 4, 8):
        init_distributed(tp, 1, seed=args.seed)
        ctx = TrainingContext(args=args, opts=None, hf_config=args.hf_config, device=get_device())
        before = _cpu_per_sample(ctx, steps, every_rank_loads=True)
        now = _cpu_per_sample(ctx, steps, every_rank_loads=False)
        rows.append({"tp": tp, "dp": 8 // tp, "cpu_ms_per_sample_before": round(before * 1e3, 2),
                     "cpu_ms_per_sample_now": round(now * 1e3, 2), "before_over_now": round(before / now, 2)})
    if dist.get_rank() == 0:
        result = {"ranks": 8, "steps": steps, "micro_batch_size": args.micro_batch_size, "rows": rows}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="micro-batches fetched per rank and mode")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "data_scale.json"))
    p.add_argument("--image-width", type=int, default=800)
    p.add_argument("--image-height", type=int, default=600)
    p.add_argument("--longest-edge", type=int, default=490, help="images resized to this (the encoder's --image-size)")
    p.add_argument("--rank-main", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main is not None:
        _rank_main(args.rank_main, args.steps, args.out)
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
