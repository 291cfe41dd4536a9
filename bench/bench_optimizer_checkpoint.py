"""Saving and loading the optimizer state of an Idefics2 at TP2 x PP2 x DP2 (8 CPU gloo ranks, distributed
optimizer): time and peak memory per rank, for this tree and, side by side in one run, another commit.

    python -m bench.bench_optimizer_checkpoint                       # --size 400m, writes bench/results/optimizer_checkpoint.json
    python -m bench.bench_optimizer_checkpoint --before da21ee0      # also the code at that commit (a git worktree)
    python -m bench.bench_optimizer_checkpoint --size 60m --out /tmp/t.json

The model is built from random weights (`--model-config`, the real Mistral tokenizer's vocabulary) and its
optimizer state is created (`materialize_state`); then every rank runs the training code's own
`save_checkpoint` and, with `--load` pointed at what it wrote, `load_training_state` (the same layout).
Per rank: the bytes of optimizer state its own optimizer holds (its share: what it must write and read
at least), and for the save and the load the wall time and the peak growth of its resident set above
what it held before the call (sampled every 2 ms by a thread; pages of safetensors files mapped while
reading count too). The model weights are saved and loaded as part of it in both versions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (vision hidden, layers), (text hidden, FFN, layers): Idefics2-shaped, GQA with 4 KV heads.
SIZES = {"60m": ((256, 4), (512, 1536, 4)), "400m": ((768, 12), (1024, 4096, 16)),
         "1b": ((768, 12), (2048, 5632, 16))}


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled by a thread."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 2**20


def _save_and_load(ctx) -> tuple:
    """(save iteration 1, resume from it at the same layout) with the code under test."""
    try:
        from megatron_patch.training.checkpointer import Checkpointer
    except ImportError:  # --before a commit older than the checkpointer
        from megatron_patch.training.checkpointing import TrainState, load_training_state, save_checkpoint

        def load_old():
            ctx.args.load, ctx.args.load_iteration = ctx.args.save, None
            load_training_state(ctx)
        return lambda: save_checkpoint(ctx, TrainState(iteration=1)), load_old

    def save():
        ctx.state.iteration = 1
        ctx.checkpointer.save()

    def load():
        settings = dataclasses.replace(ctx.settings.checkpoint, load=ctx.settings.checkpoint.save, load_iteration=None)
        Checkpointer(settings, ctx.hf_config, ctx.opts, ctx.device, ctx.report).resume(ctx.model, ctx.optimizer,
                                                                                     ctx.scheduler)
    return save, load


def _rank_main(flags: list, out: str) -> None:
    """Runs on every rank under torchrun."""
    import torch.distributed as dist

    import megatron_patch
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.optimizer_state import materialize_state, param_state_views, state_keys

    ctx = build_training(parse_args(flags))
    save, load = _save_and_load(ctx)
    keys = state_keys(ctx.args.optimizer, ctx.args.sgd_momentum)
    materialize_state(ctx.optimizer)
    held = sum(end - start for start, end, _ in param_state_views(ctx.optimizer, keys).values()) * len(keys) * 4
    figures = {"rank": dist.get_rank(), "held_optimizer_mib": held / 2**20}
    for what in ("save", "load"):
        dist.barrier()
        start = time.perf_counter()
        with PeakRSS() as rss:
            save() if what == "save" else load()
        figures[f"{what}_s"] = time.perf_counter() - start
        figures[f"{what}_peak_growth_mib"] = rss.growth_mib
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, figures)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"code": str(Path(megatron_patch.__file__).parents[1]), "ranks": everyone}))


def _model_config(root: Path, size: str) -> Path:
    """config.json of an Idefics2 of `size` beside the real Mistral tokenizer (the tiny checkpoint's folder)."""
    from transformers import AutoTokenizer

    from megatron_patch.testing.tiny import tiny_idefics2_config
    from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path

    folder = root / "model"
    build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    (v_hidden, v_layers), (hidden, ffn, layers) = SIZES[size]
    config = tiny_idefics2_config(
        vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
        fake_image_token_id=tok.convert_tokens_to_ids("<fake_token_around_image>"),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.vision_config.update(dict(hidden_size=v_hidden, intermediate_size=4 * v_hidden, num_hidden_layers=v_layers,
                                     num_attention_heads=v_hidden // 64))
    config.text_config.update(dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=4, head_dim=64))
    config.perceiver_config.update(dict(hidden_size=hidden, resampler_n_latents=64, resampler_depth=3,
                                        resampler_n_heads=hidden // 64, resampler_head_dim=64, num_key_value_heads=4))
    config.save_pretrained(folder)
    return folder / "config.json"


def _flags(root: Path, config: Path, shards: str) -> list:
    return ["--model-config", str(config), "--data-path", shards, "--save", str(root / "save"),
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--seq-length", "64", "--train-iters", "10",
            "--lr", "1e-4", "--num-workers", "0", "--seed", "7"]


def _run(code_dir: Path, flags: list, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", __file__, "--rank-main",
           str(out), *flags]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _summary(result: dict) -> dict:
    ranks = result["ranks"]
    keys = [k for k in ranks[0] if k != "rank"]
    return {k: {"max": max(r[k] for r in ranks), "min": min(r[k] for r in ranks)} for k in keys}


def parse_bench_args(p: argparse.ArgumentParser, argv, result_name: str, rank_main):
    """The bench's arguments with `--out` (default bench/results/`result_name`) and the hidden
    `--rank-main OUT FLAGS...` a rank is launched with: then runs `rank_main(FLAGS, OUT)` and returns None."""
    p.add_argument("--out", default=str(REPO / "bench" / "results" / result_name))
    p.add_argument("--rank-main", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main is not None:
        rank_main(args.rank_main[1:], args.rank_main[0])
        return None
    return args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="400m")
    p.add_argument("--before", default=None, metavar="COMMIT", help="also measure the code at this commit")
    args = parse_bench_args(p, argv, "optimizer_checkpoint.json", _rank_main)
    if args is None:
        return
    from tests.training.fixtures import training_inputs

    shards = str(training_inputs()["train"])
    results = {"size": args.size, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _model_config(root, args.size)
        trees = {"this tree": REPO}
        if args.before:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(root / "before"), args.before],
                           check=True, capture_output=True)
            trees[f"at {args.before}"] = root / "before"
        try:
            for label, code in trees.items():
                (root / label).mkdir()
                result = _run(code, _flags(root / label, config, shards), root / label / "result.json")
                results[label] = {"summary": _summary(result), **result}
                print(label, json.dumps(results[label]["summary"], indent=1))
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / "before")])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
