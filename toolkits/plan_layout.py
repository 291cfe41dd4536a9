"""Which (TP, PP, DP) layouts fit an Idefics2 model on N GPUs, from the real model built on the meta device.

    python toolkits/plan_layout.py --model idefics2-8b --gpus 8 --bf16 --use-distributed-optimizer \\
        --recompute-granularity full --micro-batch-size 1 --seq-length 4096
    python toolkits/plan_layout.py --hf-path /models/idefics2-8b --gpus 16 --bf16
    python toolkits/plan_layout.py --model-config my_config.json --gpus 8 --freeze-llm
    python toolkits/plan_layout.py --model idefics2-llama3-8b --write-config idefics2-llama3-8b.json

For every layout `validate_layout` accepts, each rank's parameters by component (held, and counted
once over the model), bytes of weights, gradients and optimizer state (plain and distributed
optimizer at that DP), activations of the micro-batch (no recompute and full recompute); then the
layouts that fit ranked, and one line per layout that does not (megatron_patch/planning/*: the
formulas are in each module's docstring). Nothing is allocated: every stage is built on the meta
device in this one process.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

PROG = "plan_layout"


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_patch.models.idefics2.reference_configs import REFERENCE_CONFIGS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", help="HF Idefics2 folder (its config.json is read; no weights needed)")
    source.add_argument("--model-config", help="an Idefics2 config.json (any file name)")
    source.add_argument("--model", choices=sorted(REFERENCE_CONFIGS), help="a real config built in code")
    p.add_argument("--write-config", help="with --model: write its config.json here and exit")
    p.add_argument("--gpus", type=int, help="GPUs to lay the model over (TP x PP x DP)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--images-per-sample", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="pixels a side (default: the config's, full size)")
    p.add_argument("--freeze-llm", action="store_true")
    p.add_argument("--freeze-clip-vision-tower", action="store_true")
    p.add_argument("--freeze-perceiver", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--summary", action="store_true", help="only the ranked layouts and the reasons, no per-rank tables")
    return p.parse_args(argv)


def _check(args) -> None:
    if args.write_config:
        if not args.model:
            raise ValueError("--write-config needs --model (the config to write)")
        return
    if args.gpus is None:
        raise ValueError("--gpus is required (the number of GPUs to plan for)")
    for flag in ("gpus", "micro_batch_size", "seq_length", "gpu_memory_gb"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.images_per_sample < 0:
        raise ValueError(f"--images-per-sample must be >= 0, got {args.images_per_sample}")
    if args.image_size is not None and args.image_size <= 0:
        raise ValueError(f"--image-size must be positive, got {args.image_size}")


def load_config(args):
    from megatron_patch.checkpoint.config_files import read_config_dict, read_idefics2_config
    from megatron_patch.models.idefics2.reference_configs import reference_config

    if args.model:
        return reference_config(args.model)
    if args.hf_path:
        return read_idefics2_config(args.hf_path)
    from transformers import Idefics2Config

    path = Path(args.model_config)
    data = read_config_dict(path.parent, path.name)
    if data.get("model_type") != "idefics2":
        raise ValueError(f"--model-config {path} is a {data.get('model_type')!r} config, not Idefics2")
    return Idefics2Config.from_dict(data)


def settings_from(args):
    from megatron_patch.planning.activations import Workload
    from megatron_patch.planning.layouts import Settings
    from megatron_patch.training.arguments import frozen_components

    work = Workload(args.micro_batch_size, args.seq_length, args.images_per_sample, args.image_size)
    return Settings(args.gpus, args.gpu_memory_gb, work, args.bf16, args.use_distributed_optimizer,
                    args.recompute_granularity, args.sequence_parallel, tuple(sorted(frozen_components(args))))


def main(argv=None) -> int:
    from megatron_patch.conversion.tooling import run_tool

    return run_tool(PROG, lambda: plan(parse_args(argv)))


def plan(args):
    _check(args)
    logging.getLogger("megatron").setLevel(logging.ERROR)  # per-build notices of megatron-core
    from megatron_patch.models.idefics2.reference_configs import write_config
    from megatron_patch.planning.census import hf_parameter_count
    from megatron_patch.planning.layouts import plan_all
    from megatron_patch.planning.report import render

    hf_config = load_config(args)
    if args.write_config:
        write_config(hf_config, args.write_config)
        return f"wrote {args.model} config to {args.write_config}"
    settings = settings_from(args)
    print(render(plan_all(hf_config, settings), settings, hf_parameter_count(hf_config), details=not args.summary))
    return None


if __name__ == "__main__":
    sys.exit(main())
