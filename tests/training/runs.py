"""Runs of the real entry point's code on gloo ranks (the pooled harness) and what the tests read back.

`train(flags)` is the body of `examples/idefics2/pretrain_megatron_idefics2.py` on each rank; the
tests then read the metrics JSONL the run wrote, or model-space tensors gathered on rank 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def train(flags: list, patch=None):
    """parse_args -> build_training -> pretrain on this rank; `patch(ctx)` may alter the built run
    and returns a function that undoes it (the pool's worker processes run later tests too)."""
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.loop import pretrain

    ctx = build_training(parse_args(flags))
    undo = patch(ctx) if patch is not None else None
    try:
        pretrain(ctx)
    finally:
        if undo is not None:
            undo()


def by_iteration(metrics_path) -> dict:
    """{iteration: last training record of it} (a resumed run appends the iterations it repeats)."""
    out = {}
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if "lm_loss" in record:
            out[record["iteration"]] = record
    return out


def validation(metrics_path) -> list:
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if "validation_loss" in line]


def _gather_to_hf(local: dict, ctx) -> dict | None:
    """{(stage, tp, local name): tensor} of every rank -> HF-named tensors on rank 0 (None elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.models.idefics2.model_loading import assemble_hf_tensors, pipeline_layout

    mine = local if ps.get_data_parallel_rank() == 0 else {}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    shards = {k: v for part in gathered for k, v in part.items()}
    layout = pipeline_layout(ctx.hf_config, ctx.opts)
    return assemble_hf_tensors(shards, ctx.hf_config, layout, ctx.opts.tensor_model_parallel_size)


def loaded_optimizer_state(flags: list) -> dict | None:
    """Build (and so resume) a run, then return its optimizer state in model space, HF-named:
    {state key: {hf name: tensor}} on rank 0. Parameters without that state are left out."""
    from megatron.core import parallel_state as ps

    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.optimizer_state import local_state_pieces, state_keys

    ctx = build_training(parse_args(flags))
    keys = state_keys(ctx.args.optimizer, ctx.args.sgd_momentum)
    stage, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    pieces = [(name, start, end, shape, {k: v.cpu().clone() for k, v in states.items()})
              for name, start, end, shape, states in local_state_pieces(ctx.model, ctx.optimizer, ctx.opts, keys)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (stage, tp, pieces))
    per_key = {k: {} for k in keys}  # every DP rank's ranges put together into whole TP shards
    for stage_, tp_, rank_pieces in everyone:
        for name, start, end, shape, states in rank_pieces:
            for key, flat in states.items():
                full = per_key[key].setdefault((stage_, tp_, name), torch.zeros(shape))
                full.view(-1)[start:end] = flat
    return _gather_states(per_key, ctx)


def _gather_states(per_key: dict, ctx):
    from megatron_patch.models.idefics2.config import tied_word_embeddings
    from megatron_patch.models.idefics2.model_loading import pipeline_layout
    from megatron_patch.models.idefics2.weight_mapping import adapter_mappings, mcore_to_hf, tensor_mappings

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(per_key, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    layout = pipeline_layout(ctx.hf_config, ctx.opts)
    tp_size = ctx.opts.tensor_model_parallel_size
    tied = tied_word_embeddings(ctx.hf_config)
    mappings = tensor_mappings(ctx.hf_config) + (adapter_mappings(ctx.hf_config, ctx.args.lora.targets)
                                                 if ctx.args.lora else [])
    out = {}
    for key in per_key:
        shards = {k: v for part in gathered for k, v in part[key].items()}
        hf = {}
        for m in mappings:
            for stage, local in layout.placements(m, tied)[:1]:
                if (stage, 0, local) in shards:
                    hf.update(zip(m.hf, mcore_to_hf(m, [shards[(stage, r, local)] for r in range(tp_size)])))
        out[key] = hf
    return out


def saved_optimizer_state(iteration_dir, keys) -> dict:
    """The optimizer state a checkpoint holds, HF-named, merged from its rank folders' parts."""
    from megatron_patch.checkpoint.optimizer_parts import OptimizerPartsReader
    from megatron_patch.checkpoint.reshard import ShardedCheckpoint

    out = {}
    for key in keys:
        source = ShardedCheckpoint(iteration_dir, prefix=f"{key}/", reader_class=OptimizerPartsReader)
        names = dict.fromkeys(name for m in source.mappings for name in m.hf)  # a LoRA checkpoint: adapters
        out[key] = {name: source.hf_tensor(name) for name in names}
    return out


def model_weights(flags: list) -> dict | None:
    """Train with `flags`, then the model's weights, HF-named, on rank 0."""
    from megatron.core import parallel_state as ps

    from megatron_patch.models.idefics2.model_loading import unwrap
    from megatron_patch.models.idefics2.model_loading import local_tensors
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.loop import pretrain

    ctx = build_training(parse_args(flags))
    pretrain(ctx)
    stage, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    local = {(stage, tp, k): v for k, v in local_tensors(unwrap(ctx.model), ctx.opts).items()}
    return _gather_to_hf(local, ctx)


def who_loads(flags: list):
    """(TP rank, PP rank, whether this rank built a data loader) after building a run."""
    from megatron.core import parallel_state as ps

    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training

    ctx = build_training(parse_args(flags))
    return ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ctx.train_loader is not None
