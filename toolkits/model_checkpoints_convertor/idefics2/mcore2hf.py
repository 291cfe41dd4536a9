"""Convert a Megatron Idefics2 checkpoint (any TP x PP) back into a Hugging Face checkpoint.

    python toolkits/model_checkpoints_convertor/idefics2/mcore2hf.py \\
        --load-path /ckpts/idefics2-8b-tp2-pp2 --save-path /models/idefics2-8b-finetuned \\
        [--iteration 2000] [--max-shard-size 5GB] [--overwrite]
    python toolkits/model_checkpoints_convertor/idefics2/mcore2hf.py \\
        --load-path /ckpts/idefics2-8b-lora --save-path /adapters/my-lora --adapter-only

A LoRA checkpoint (adapters only) is written merged into the base it records (`--lora-base` if the
base moved), a full model like any other; with `--adapter-only` as a peft adapter folder
(`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads on
transformers' Idefics2 built from the base.

Takes the tracker's iteration (or --iteration N / release), merges the TP shards and PP stages of
each tensor through the model's weight mapping one tensor at a time, writes it straight into its
planned place in its shard (memory: one merged tensor, whatever the shard size), and writes `config.json`,
sharded safetensors with `model.safetensors.index.json`, and the tokenizer/processor files the
checkpoint carries, so `Idefics2ForConditionalGeneration.from_pretrained(SAVE)` and
`AutoProcessor.from_pretrained(SAVE)` load it. Before anything is published it checks that every
rank tensor was read exactly once and every HF tensor was written with the expected shape.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

from megatron_patch.checkpoint.config_files import (
    CONFIG_FILE,
    HF_CONFIG_DIR,
    read_config_dict,
    write_config_dir,
)
from megatron_patch.checkpoint.adapters import check_base
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import fresh_staging, parse_iteration, resolve_iteration, staging_path
from megatron_patch.checkpoint.reshard import ShardedCheckpoint
from megatron_patch.checkpoint.safetensors_io import release_freed_memory
from megatron_patch.checkpoint.verify import hf_tensor_shapes, verify_rank_folders
from megatron_patch.conversion.hf_files import HFShardWriter
from megatron_patch.conversion.lora_export import AdapterMerge, adapter_tensors
from megatron_patch.conversion.publish import publish
from megatron_patch.conversion.read_once import mapping_groups, require_used_once
from megatron_patch.conversion.tooling import Summary, parse_size, progress, run_tool
from megatron_patch.models.idefics2.lora import LoraSettings
from megatron_patch.models.idefics2.peft_adapter import CONFIG as PEFT_CONFIG
from megatron_patch.models.idefics2.peft_adapter import write_peft_adapter

PROG = "mcore2hf"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-path", required=True, help="Megatron checkpoint folder (with the tracker file)")
    parser.add_argument("--save-path", required=True, help="HF output folder")
    parser.add_argument("--iteration", default=None, help="iteration number or 'release' (default: the tracker's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a different HF checkpoint at --save-path")
    parser.add_argument("--adapter-only", action="store_true",
                        help="a LoRA checkpoint: write its adapters as a peft folder instead of the merged model")
    parser.add_argument("--lora-base", default=None, help="a LoRA checkpoint's base, if moved from the recorded path")
    return parser.parse_args(argv)


def check_save_path(save: Path, hf_config, overwrite: bool) -> None:
    """Refuse early: a file, a non-empty folder that is no HF checkpoint, or another model's config."""
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"--save-path {save} is a file, not a folder")
    if not save.is_dir() or not any(p for p in save.iterdir() if not p.name.startswith(".")):
        return
    if not (save / CONFIG_FILE).is_file():
        raise CheckpointError(f"--save-path {save} is not empty and holds no HF checkpoint (no {CONFIG_FILE}); choose a new folder")
    if overwrite:
        return
    ours = json.loads(hf_config.to_json_string())
    theirs = read_config_dict(save)
    for config in (ours, theirs):
        config.pop("transformers_version", None)
    if ours != theirs:
        raise CheckpointError(f"--save-path {save} already holds a different HF checkpoint ({CONFIG_FILE} differs); pass --overwrite to replace it")


def convert(args: argparse.Namespace) -> str:
    summary = Summary(PROG)
    load, save = Path(args.load_path), Path(args.save_path)
    iteration = parse_iteration(args.iteration) if args.iteration is not None else None
    iteration, folder = resolve_iteration(load, iteration)
    source = ShardedCheckpoint(folder)
    lora = source.info.lora
    if args.adapter_only:
        return export_adapter(source, save, args.overwrite, summary, iteration)
    if args.lora_base and lora is None:
        raise CheckpointError(f"--lora-base: {folder} is a full checkpoint, not a LoRA one; drop --lora-base")
    merge = None
    if lora is not None:  # the base's tensors stream through, each with its adapter merged in
        merge = AdapterMerge.of_checkpoint(source)
        base, base_iteration = check_base(lora, folder, args.lora_base)
        source = ShardedCheckpoint(resolve_iteration(base, base_iteration)[1])
    hf_config, layout, tp = source.hf_config, source.layout, source.tp_size
    hf_shapes = hf_tensor_shapes(hf_config)
    verify_rank_folders(source.dir, hf_config, layout, tp, hf_shapes)
    check_save_path(save, hf_config, args.overwrite)
    max_shard = parse_size(args.max_shard_size)

    save.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging(save)
    try:
        plan = {}  # HF name -> (dtype, shape): fixes the shard layout before any tensor is merged
        for group in mapping_groups(hf_config):
            stage, local = layout.placements(group[0], source.tied)[0]
            dtype = source.reader(stage, 0).dtype(local)
            plan.update({name: (dtype, hf_shapes[name]) for name in group[0].hf})
        writer = HFShardWriter(staging, plan, max_shard)
        uses = Counter()
        bar = progress(None, total=len(hf_shapes), desc=PROG)
        for group in mapping_groups(hf_config):
            merged = None
            for m in group:
                for stage, local in layout.placements(m, source.tied):
                    shards = source.mcore_shards(stage, local)
                    uses.update((stage, r, local) for r in range(tp))
                    summary.read_tensors += len(shards)
                    summary.read_bytes += sum(s.nbytes for s in shards)
                    tensors = source.hf_tensors(m, stage, local, shards)  # refuses unequal KV copies
                    if merged is None:
                        merged = tensors
                    elif not all(torch.equal(a, b) for a, b in zip(merged, tensors)):
                        raise CheckpointError(
                            f"{local} of pipeline stage {stage} should equal the tied embedding {m.hf[0]}, but differs"
                        )
            for name, tensor in zip(group[0].hf, merged):
                writer.add(name, tensor if merge is None else merge(name, tensor))  # checks dtype and the shape config.json implies
                summary.written_tensors += 1
                summary.written_bytes += tensor.nbytes
            del merged, shards, tensors
            release_freed_memory()  # keep the resident size at one tensor group
            bar.update(len(group[0].hf))
        bar.close()
        writer.close()  # checks every HF tensor was written
        if merge is not None:
            merge.check_all_merged()

        rank_tensors = [(stage, r, name) for stage, r in source.ranks() for name in source.reader(stage, r).names()]
        require_used_once(uses, rank_tensors, lambda key: f"tensor {key[2]} of {source.rank_dir(*key[:2])}")
        write_config_dir(staging, hf_config, side_files_from=folder / HF_CONFIG_DIR)
        status = publish(staging, save, args.overwrite, "HF checkpoint")
    finally:
        if staging_path(save).exists():
            shutil.rmtree(staging_path(save))
    merged = f", LoRA adapters merged into {source.dir}" if merge is not None else ""
    return summary.line(save, f"{status}, iteration {iteration}{merged}")


def export_adapter(source: ShardedCheckpoint, save: Path, overwrite: bool, summary: Summary, iteration) -> str:
    """A LoRA checkpoint's adapters as a peft folder."""
    lora = source.info.lora
    if lora is None:
        raise CheckpointError(f"--adapter-only: {source.dir} is a full checkpoint, not a LoRA one; drop --adapter-only")
    verify_rank_folders(source.dir, source.hf_config, source.layout, source.tp_size, lora=lora)
    if save.is_file() or (save.is_dir() and any(save.iterdir()) and not (save / PEFT_CONFIG).is_file()):
        raise CheckpointError(f"--save-path {save} is a file or a folder holding no peft adapter; choose a new folder")
    tensors = adapter_tensors(source)
    summary.read_tensors = summary.written_tensors = len(tensors)
    summary.read_bytes = summary.written_bytes = sum(t.nbytes for t in tensors.values())
    save.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging(save)
    try:
        write_peft_adapter(staging, LoraSettings.from_record(lora), tensors, base=lora["base"]["path"])
        status = publish(staging, save, overwrite, "peft adapter")
    finally:
        if staging_path(save).exists():
            shutil.rmtree(staging_path(save))
    return summary.line(save, f"{status}, peft adapter of iteration {iteration}")


def main(argv=None) -> int:
    return run_tool(PROG, lambda: convert(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
