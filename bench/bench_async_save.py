"""The training stall of a checkpoint save, with and without --async-save: an Idefics2 of ~0.4 B
parameters at PP2 on 2 CPU gloo ranks (distributed optimizer, Adam), side by side in one invocation.

    python -m bench.bench_async_save                  # writes bench/results/async_save.json
    python -m bench.bench_async_save --size 60m --iters 4 --out /tmp/a.json

Each mode trains the same `--iters` iterations (even) from the same random weights: without saves,
saving every 2 iterations synchronously, and with --async-save. Per rank: the wall time of the whole
loop; the time the loop spent inside the checkpointer's `maybe_save` after each iteration (the stall:
the whole save when synchronous; the host copy plus any wait for the previous background write with
--async-save); and the time at the end (waiting for the last background write). The slowdown of the
iterations that run while a background write competes for the cores shows in the loop time. A ~1 B
model does not fit two fp32 Adam ranks plus their host copies in this machine's 24 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_optimizer_checkpoint import SIZES, _model_config, parse_bench_args

REPO = Path(__file__).resolve().parents[1]
KEEP = ["--save-interval", "2", "--save-total-limit", "1"]  # one folder kept: ~6 GB a save at 400m
MODES = {"no saves": None, "synchronous": KEEP, "async": KEEP + ["--async-save"]}


def _rank_main(flags: list, out: str) -> None:
    """Runs on every rank under torchrun."""
    import torch
    import torch.distributed as dist

    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.checkpointer import Checkpointer
    from megatron_patch.training.loop import pretrain

    torch.set_num_threads(1)
    ctx = build_training(parse_args(flags))
    stall, original = [], Checkpointer.maybe_save

    def timed(self, iteration, last=False):
        start = time.perf_counter()
        try:
            return original(self, iteration, last)
        finally:
            stall.append((iteration, last, time.perf_counter() - start))

    Checkpointer.maybe_save = timed
    dist.barrier()
    start = time.perf_counter()
    pretrain(ctx)
    loop_s = time.perf_counter() - start
    figures = {"rank": dist.get_rank(), "loop_s": loop_s, "calls": stall,
               "stall_s": sum(s for _, last, s in stall if not last),  # after each iteration, in the loop
               "end_wait_s": sum(s for _, last, s in stall if last)}  # the end: waiting for the last write
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, figures)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone))


def _flags(root: Path, config: Path, shards: str, iters: int, extra) -> list:
    save = ["--save", str(root / "save"), *extra] if extra is not None else []
    return ["--model-config", str(config), "--data-path", shards, *save, "--pipeline-model-parallel-size", "2",
            "--use-distributed-optimizer", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--seq-length", "128", "--train-iters", str(iters), "--lr", "1e-4",
            "--num-workers", "0", "--seed", "7", "--log-interval", "1"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="400m")
    p.add_argument("--iters", type=int, default=6)
    args = parse_bench_args(p, argv, "async_save.json", _rank_main)
    if args is None:
        return
    from tests.training.fixtures import training_inputs

    shards = str(training_inputs()["train"])
    results = {"size": args.size, "iters": args.iters, "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _model_config(root, args.size)
        for mode, extra in MODES.items():
            folder = root / mode.replace(" ", "_")
            folder.mkdir()
            out = folder / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                   "bench.bench_async_save", "--rank-main", str(out),
                   *_flags(folder, config, shards, args.iters, extra)]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
            ranks = json.loads(out.read_text())
            saves = args.iters // 2 if extra is not None else 0
            results[mode] = {"saves": saves, "ranks": ranks, "loop_s": max(r["loop_s"] for r in ranks),
                             "stall_s": max(r["stall_s"] for r in ranks),
                             "end_wait_s": max(r["end_wait_s"] for r in ranks)}
            print(mode, json.dumps({k: v for k, v in results[mode].items() if k != "ranks"}))
    for mode in ("synchronous", "async"):
        r = results[mode]
        r["stall_per_save_s"] = r["stall_s"] / max(r["saves"], 1)
        r["loop_overhead_per_save_s"] = (r["loop_s"] - results["no saves"]["loop_s"]) / max(r["saves"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
