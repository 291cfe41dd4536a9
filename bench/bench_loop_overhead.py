"""One training iteration of the tiny Idefics2 at TP2 x PP2 on 4 CPU gloo ranks, and what the loop adds.

Times, side by side in one run and on the same pre-fetched micro-batches:
  bare   megatron-core's schedule alone: zero grad buffers + forward/backward (1F1B) + grad finalisation,
         over micro-batches read from the loader beforehand (their transport to the ranks and pixel
         normalisation run inside the schedule's forward step, training/micro_batches.py: here too)
  loop   the training loop's iteration: loader fetch + the same schedule + guarded optimizer step
         (NaN agreement, grad norm, clipping, Adam, distributed-optimizer gather) + LR step + metrics
Rounds alternate (bare, loop, bare, ...) so machine noise hits both alike; medians are reported.

    python -m bench.bench_loop_overhead                     # writes bench/results/loop_overhead.json
    python -m bench.bench_loop_overhead --rounds 10 --out /tmp/t.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rank_main(flags: list, rounds: int, out: str) -> None:
    """Runs on every rank under torchrun."""
    import torch
    import torch.distributed as dist

    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.interval_meter import IntervalMeter
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from megatron_patch.training.micro_batches import micro_batches
    from megatron_patch.training.step import run_schedule, train_step

    torch.set_num_threads(1)
    ctx = build_training(parse_args(flags))
    data = iter(ctx.train_loader) if ctx.train_loader is not None else None  # the loading ranks
    meter = IntervalMeter(ctx)
    ctx.model.train()
    fixed = [next(data) for _ in range(get_num_microbatches())] if data is not None else None

    def bare():
        ctx.model.zero_grad_buffer()
        run_schedule(ctx, micro_batches(ctx, iter(fixed) if fixed is not None else None), forward_only=False)

    def loop():
        micro = micro_batches(ctx, data)
        meter.add(train_step(ctx, micro), micro)

    times = {"bare": [], "loop": []}
    for _ in range(2):  # warm-up
        bare(), loop()
    for _ in range(rounds):
        for name, fn in (("bare", bare), ("loop", loop)):
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        bare_ms, loop_ms = (statistics.median(times[k]) * 1e3 for k in ("bare", "loop"))
        result = {
            "layout": "TP2 x PP2 x DP1, 4 gloo ranks, 1 thread each",
            "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
            "torch": torch.__version__, "rounds": rounds,
            "micro_batches_per_iteration": get_num_microbatches(), "micro_batch_size": ctx.args.micro_batch_size,
            "seq_length": ctx.args.seq_length,
            "bare_forward_backward_ms": round(bare_ms, 1), "loop_iteration_ms": round(loop_ms, 1),
            "loop_overhead_ms": round(loop_ms - bare_ms, 1), "loop_over_bare": round(loop_ms / bare_ms, 3),
            "bare_ms_per_round": [round(t * 1e3, 1) for t in times["bare"]],
            "loop_ms_per_round": [round(t * 1e3, 1) for t in times["loop"]],
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


def _prepare(root: Path) -> list:
    """Tiny model (release at TP2 x PP2) and shards, built with the project's own tools."""
    from tests.training.fixtures import train_flags, training_inputs

    inputs = training_inputs()
    return train_flags(inputs, root / "save", iters=1000, mbs=2, gbs=8,
                       extra=["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--use-distributed-optimizer", "--save-interval", "100000"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "loop_overhead.json"))
    p.add_argument("--rank-main", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main is not None:
        _rank_main(args.rank_main, args.rounds, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        flags = _prepare(Path(tmp))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", __file__,
               "--rounds", str(args.rounds), "--out", args.out, "--rank-main", *flags]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
