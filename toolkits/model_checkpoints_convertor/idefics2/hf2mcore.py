"""Convert a Hugging Face Idefics2 checkpoint into a Megatron checkpoint at any TP x PP layout.

    python toolkits/model_checkpoints_convertor/idefics2/hf2mcore.py \\
        --load-path /models/idefics2-8b --save-path /ckpts/idefics2-8b-tp2-pp2 \\
        --target-tensor-model-parallel-size 2 --target-pipeline-model-parallel-size 2 \\
        [--target-decoder-first-pipeline-num-layers 14] [--memory-budget 256MB] [--overwrite]

Reads `model.safetensors` or a sharded `model.safetensors.index.json` one tensor at a time, splits
each through the model's weight mapping and writes `SAVE/release/` (layout: docs/checkpoints.md),
holding at most --memory-budget of converted tensors before writing them out. Before the tracker
says `release` it checks: every source tensor read exactly once, every target tensor written with
the shape the mapping gives. Bad input ends in one `error:` line and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

from megatron_patch.checkpoint.config_files import HF_CONFIG_DIR, read_idefics2_config, write_config_dir
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.info import CheckpointInfo
from megatron_patch.checkpoint.layout import (
    RELEASE,
    fresh_staging,
    holds_checkpoint,
    rank_dir_name,
    read_tracker,
    staging_path,
    write_tracker,
)
from megatron_patch.checkpoint.model_files import WriterPool
from megatron_patch.checkpoint.safetensors_io import release_freed_memory
from megatron_patch.checkpoint.verify import hf_tensor_shapes, verify_rank_folders
from megatron_patch.conversion.hf_files import HFWeightsReader
from megatron_patch.conversion.publish import publish
from megatron_patch.conversion.read_once import mapping_groups, require_used_once
from megatron_patch.conversion.tooling import Summary, parse_size, progress, run_tool
from megatron_patch.models.idefics2.config import ParallelOptions, tied_word_embeddings, validate_layout
from megatron_patch.models.idefics2.weight_mapping import (
    HF_EMBED_TOKENS,
    HF_LM_HEAD,
    PipelineLayout,
    hf_to_mcore,
)

PROG = "hf2mcore"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-path", required=True, help="HF Idefics2 folder (config.json + safetensors)")
    parser.add_argument("--save-path", required=True, help="Megatron checkpoint folder; release/ is written in it")
    parser.add_argument("--target-tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--target-decoder-first-pipeline-num-layers", type=int, default=None,
                        help="LLM layers on pipeline stage 0 when the split is uneven")
    parser.add_argument("--memory-budget", default="256MB",
                        help="converted tensors held in memory before they are written (also the largest file)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different checkpoint at --save-path")
    return parser.parse_args(argv)


def check_source(reader: HFWeightsReader, hf_shapes: dict, tied: bool) -> set:
    """Every tensor the config implies is present with its shape and nothing else is; returns the
    names that are present but need no conversion (a tied head saved anyway, equal to the embedding)."""
    names = set(reader.names())
    missing = [n for n in hf_shapes if n not in names]
    if missing:
        raise CheckpointError(
            f"HF checkpoint {reader.hf_dir} lacks tensor {missing[0]} "
            f"({len(missing)} of the {len(hf_shapes)} tensors its config.json implies are missing)"
        )
    redundant = set()
    for name in sorted(names - set(hf_shapes)):
        if tied and name == HF_LM_HEAD:
            if not torch.equal(reader.get(name), reader.get(HF_EMBED_TOKENS)):
                raise CheckpointError(f"config.json ties the head to the embedding, but {name} differs from {HF_EMBED_TOKENS}")
            redundant.add(name)
            continue
        raise CheckpointError(
            f"HF checkpoint {reader.hf_dir} holds tensor {name}, which is not part of the Idefics2 model its config.json describes"
        )
    for name, shape in hf_shapes.items():
        if reader.shape(name) != shape:
            raise CheckpointError(f"HF tensor {name} has shape {reader.shape(name)}, but config.json implies {shape}")
    return redundant


def check_save_path(save: Path, info: CheckpointInfo, overwrite: bool) -> None:
    """Refuse early (before any work) what would clearly replace a different checkpoint."""
    if save.exists() and not save.is_dir():
        raise CheckpointError(f"--save-path {save} is a file, not a folder")
    if overwrite or not save.is_dir() or not any(p for p in save.iterdir() if not p.name.startswith(".")):
        return
    if not holds_checkpoint(save):
        raise CheckpointError(f"--save-path {save} is not empty and holds no Megatron checkpoint; choose an empty folder")
    tracker = read_tracker(save)
    if tracker not in (None, RELEASE):
        raise CheckpointError(
            f"--save-path {save} holds a training checkpoint (tracker names iteration {tracker}); "
            f"pass --overwrite to add release/ and point the tracker at it"
        )
    if (save / RELEASE).is_dir():
        old = CheckpointInfo.read(save / RELEASE)
        if not old.same_layout(info):
            raise CheckpointError(
                f"--save-path {save} already holds a different checkpoint (release/ is TP={old.tensor_model_parallel_size} "
                f"x PP={old.pipeline_model_parallel_size}); pass --overwrite to replace it"
            )


def convert(args: argparse.Namespace) -> str:
    summary = Summary(PROG)
    load, save = Path(args.load_path), Path(args.save_path)
    if not load.is_dir():
        raise CheckpointError(f"--load-path {load} is not a folder")
    hf_config = read_idefics2_config(load)
    tp, pp = args.target_tensor_model_parallel_size, args.target_pipeline_model_parallel_size
    opts = ParallelOptions(tp, pp, args.target_decoder_first_pipeline_num_layers)
    try:
        validate_layout(hf_config, opts)
    except ValueError as err:  # name this tool's flags, not the training flags
        raise CheckpointError(re.sub(r"--(tensor|pipeline|decoder)-", r"--target-\1-", str(err))) from None
    budget = parse_size(args.memory_budget)
    reader = HFWeightsReader(load)
    hf_shapes = hf_tensor_shapes(hf_config)
    tied = tied_word_embeddings(hf_config)
    redundant = check_source(reader, hf_shapes, tied)
    info = CheckpointInfo(RELEASE, tp, pp, opts.decoder_first_pipeline_num_layers, created_by=PROG)
    check_save_path(save, info, args.overwrite)

    layout = PipelineLayout(hf_config.text_config.num_hidden_layers, pp, opts.decoder_first_pipeline_num_layers)
    created_save = not save.exists()
    save.mkdir(parents=True, exist_ok=True)
    final = save / RELEASE
    staging = fresh_staging(final)
    status = None
    try:
        pool = WriterPool(staging, budget)
        uses = Counter()
        bar = progress(None, total=len(hf_shapes), desc=PROG)
        for group in mapping_groups(hf_config):
            hf = []
            for name in group[0].hf:
                hf.append(reader.get(name))
                uses[name] += 1
                summary.read(hf[-1])
            for m in group:
                for stage, local in layout.placements(m, tied):
                    for r in range(tp):
                        pool.add(rank_dir_name(r, stage, pp), local, hf_to_mcore(m, hf, r, tp))
            del hf  # only the buffered shards stay
            release_freed_memory()
            bar.update(len(group[0].hf))
        bar.close()
        summary.written_tensors, summary.written_bytes = pool.close()

        require_used_once(uses, [n for n in reader.names() if n not in redundant], lambda n: f"source tensor {n}")
        verify_rank_folders(staging, hf_config, layout, tp, hf_shapes)
        dataclasses.replace(info, num_tensors=summary.written_tensors, total_bytes=summary.written_bytes).write(staging)
        write_config_dir(staging / HF_CONFIG_DIR, hf_config, side_files_from=load)
        status = publish(staging, final, args.overwrite, "Megatron checkpoint")
        write_tracker(save, RELEASE)
    finally:
        if staging_path(final).exists():
            shutil.rmtree(staging_path(final))
        if status is None and created_save and not any(save.iterdir()):
            save.rmdir()  # a failed run leaves no trace, not even the folder it made
    return summary.line(final, status)


def main(argv=None) -> int:
    return run_tool(PROG, lambda: convert(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
