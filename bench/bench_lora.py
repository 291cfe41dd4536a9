"""LoRA against full fine-tuning of one Idefics2-shaped model on CPU: peak memory and step time, side by
side in one invocation (1 gloo rank, TP1 x PP1, fp32, Adam; a fresh process per mode).

    python -m bench.bench_lora                        # --size 1b, writes bench/results/lora.json
    python -m bench.bench_lora --size 60m --iters 3 --out /tmp/l.json

Both modes train the same random weights (same seed) on the same data for `--iters` iterations through
the training code (`build_training`, `pretrain`): "full" trains every parameter, "lora" adds adapters of
`--rank` (alpha 2 x rank, the default seven targets of the language model) and freezes the base. Per
mode: the trainable parameters, the bytes of Adam's moments (exp_avg, exp_avg_sq) and of DDP's gradient
buffer, the resident set after the build and its peak over build and training (sampled every 2 ms),
and the median time of the iterations after `--warmup` (`elapsed_ms_per_iteration` of the metrics
JSONL at --log-interval 1: data, forward, backward, optimizer step). OMP_NUM_THREADS=`--threads`
for both.
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
from pathlib import Path

from bench.bench_optimizer_checkpoint import PeakRSS, SIZES, _model_config, parse_bench_args

REPO = Path(__file__).resolve().parents[1]


def _rank_main(flags: list, out: str) -> None:
    """Runs one mode under torchrun (world of 1)."""
    from megatron_patch.models.idefics2.model_loading import unwrap
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.freezing import parameter_table
    from megatron_patch.training.loop import pretrain
    from megatron_patch.training.optimizer_state import param_state_views

    with PeakRSS() as rss:
        ctx = build_training(parse_args(flags))
        built = rss._proc.memory_info().rss
        pretrain(ctx)
    table = parameter_table(unwrap(ctx.model), ctx.device)
    moments = param_state_views(ctx.optimizer, ("exp_avg", "exp_avg_sq")).values()
    figures = {
        "trainable_params": sum(c.trained + c.adapters for c in table.values()),
        "total_params": sum(sum(c) for c in table.values()),
        "adam_moments_bytes": sum(t.numel() * t.element_size() for *_, views in moments for t in views.values()),
        "grad_buffer_bytes": sum(b.grad_data.numel() * b.grad_data.element_size() for b in ctx.model.buffers),
        "rss_after_build_bytes": built,
        "peak_rss_bytes": rss.peak,
    }
    Path(out).write_text(json.dumps(figures))


def _flags(config: Path, shards: str, iters: int, metrics: Path) -> list:
    return ["--model-config", str(config), "--data-path", shards, "--micro-batch-size", "1",
            "--global-batch-size", "2", "--seq-length", "128", "--train-iters", str(iters), "--lr", "1e-4",
            "--optimizer", "adam", "--num-workers", "0", "--seed", "7", "--log-interval", "1",
            "--metrics-jsonl", str(metrics)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--iters", type=int, default=6, help="iterations per mode, --warmup of them not timed")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both modes")
    args = parse_bench_args(p, argv, "lora.json", _rank_main)
    if args is None:
        return
    from tests.training.fixtures import training_inputs

    shards = str(training_inputs()["train"])
    modes = {"full": [], "lora": ["--lora-rank", str(args.rank), "--lora-alpha", str(2 * args.rank)]}
    results = {"size": args.size, "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
               "lora_rank": args.rank, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _model_config(root, args.size)
        for mode, extra in modes.items():
            out, metrics = root / f"{mode}.json", root / f"{mode}.jsonl"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "bench.bench_lora",
                   "--rank-main", str(out), *_flags(config, shards, args.iters, metrics), *extra]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
            step_ms = [json.loads(line)["elapsed_ms_per_iteration"] for line in metrics.read_text().splitlines()
                       if "elapsed_ms_per_iteration" in line]
            results[mode] = {**json.loads(out.read_text()), "step_ms": step_ms,
                             "median_step_s": statistics.median(step_ms[args.warmup:]) / 1000}
            print(mode, json.dumps(results[mode]))
    results["lora_over_full"] = {k: results["lora"][k] / results["full"][k]
                                 for k in ("peak_rss_bytes", "median_step_s", "trainable_params")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
