"""Training checkpoints: model, optimizer, LR schedule, RNG, progress and loader state, resumable.

On top of `megatron_patch.checkpoint` (the per-rank safetensors layout of `docs/checkpoints.md`),
an iteration folder written by training also holds:

    iter_0000100/train_state.json              iteration, consumed_samples, skip counters, the LR
                                               schedule's state, the layout and optimizer it ran with
    iter_0000100/mp_rank_TT_PPP/optimizer-dpRRR.safetensors
                                               per-parameter optimizer state in model space, one
                                               part per DP rank (optimizer_state.py), unless --no-save-optim
    iter_0000100/loader/dp_RRR.json            each DP rank's `loader.state_dict()`
    iter_0000100/rng/rank_RRRRR.pt             each rank's python / numpy / torch / megatron RNG states

Everything is written into the hidden staging folder, fsynced, and published by one rename; the
tracker is replaced atomically last (checkpoint/saving.py). A kill at any moment leaves the
previous checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_patch.checkpoint import (
    RELEASE,
    CheckpointError,
    load_pt,
    rank_dir_name,
    resolve_iteration,
    save_model_weights,
)
from megatron_patch.checkpoint.layout import write_durable
from megatron_patch.training.optimizer import finish_param_gather
from megatron_patch.training.optimizer_state import (
    load_optimizer_state,
    optimizer_step_count,
    save_optimizer_state,
    set_optimizer_step_count,
    state_keys,
)

TRAIN_STATE_FILE = "train_state.json"
# Schedule settings a resume must not change silently (Megatron-LM refuses them too).
_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style"}


@dataclass
class TrainState:
    """Progress of a run (what `train_state.json` holds besides the schedule)."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _layout() -> dict:
    return {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size()}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    *keys, version = state["python"]
    random.setstate((version, tuple(keys), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _max_over_ranks(value: int, device) -> int:
    if not dist.is_initialized():
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box)


def _save_pt(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(ctx, state: TrainState) -> Path:
    """Save everything a resume needs at `state.iteration` (collective: every rank calls it)."""
    args = ctx.args
    keys = state_keys(args.optimizer, args.sgd_momentum)
    finish_param_gather(ctx.model)  # --overlap-param-gather: this rank holds only its shard's updates
    # Agreed over ranks before the save (extras must stay free of collectives: a rank that failed
    # writing skips them); rank 0 records it, and its own optimizer may hold nothing (all frozen).
    step = _max_over_ranks(optimizer_step_count(ctx.optimizer), ctx.device)

    def extras(staging: Path) -> None:
        tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        dp = parallel_state.get_data_parallel_rank()
        if not args.no_save_optim:
            rank_dir = staging / rank_dir_name(tp, pp, args.pipeline_model_parallel_size)
            save_optimizer_state(rank_dir, ctx.model, ctx.optimizer, ctx.opts, keys)
        if tp == 0 and pp == 0 and ctx.train_loader is not None:
            (staging / "loader").mkdir(exist_ok=True)
            write_durable(staging / "loader" / f"dp_{dp:03d}.json", json.dumps(ctx.train_loader.state_dict()))
        (staging / "rng").mkdir(exist_ok=True)
        _save_pt(_rng_state(), staging / "rng" / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            record = {**asdict(state), "scheduler": ctx.scheduler.state_dict(), "layout": _layout(),
                      "optimizer": args.optimizer, "has_optimizer_state": not args.no_save_optim,
                      "optimizer_step": step, "seed": args.seed,
                      "pack_sequences": bool(args.pack_sequences)}
            write_durable(staging / TRAIN_STATE_FILE, json.dumps(record, indent=2) + "\n")

    return save_model_weights(ctx.model, args.save, state.iteration, ctx.hf_config, ctx.opts,
                              config_source=Path(args.tokenizer_dir), before_commit=extras,
                              keep_last=args.save_total_limit)


def _check_schedule(saved: dict, scheduler) -> None:
    for key, flag in _SCHEDULE_FLAGS.items():
        ours = getattr(scheduler, key)
        if key in saved and saved[key] != ours:
            raise CheckpointError(f"{flag} gives {ours!r} but the checkpoint was trained with {saved[key]!r}; "
                                  f"resume with the same value, or start a new schedule with --finetune")


def read_train_state(folder: Path) -> Optional[dict]:
    path = folder / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def load_training_state(ctx) -> TrainState:
    """Resume progress, schedule, optimizer, RNG and loader state from --load (weights are loaded
    before the optimizer is built). `release` and --finetune start at iteration 0."""
    args = ctx.args
    if not args.load:
        return TrainState()
    iteration, folder = resolve_iteration(args.load, args.load_iteration)
    saved = read_train_state(folder)
    if args.finetune or iteration == RELEASE or saved is None:
        reason = "--finetune" if args.finetune else ("release" if iteration == RELEASE else "no training state")
        ctx.report(f"loaded weights of {folder} ({reason}): starting at iteration 0 with 0 consumed samples")
        return TrainState()
    state = TrainState(saved["iteration"], saved["consumed_samples"], saved["skipped_iterations"],
                       saved["nan_iterations"])
    if saved.get("seed", args.seed) != args.seed:  # the data order and augmentations follow the seed
        raise CheckpointError(f"--seed {args.seed} differs from the checkpoint's {saved['seed']}: the resumed run "
                              f"would see another data order; resume with --seed {saved['seed']} or use --finetune")
    _check_schedule(saved["scheduler"], ctx.scheduler)
    ctx.scheduler.load_state_dict(saved["scheduler"])
    if not args.no_load_optim:
        if not saved.get("has_optimizer_state") or saved.get("optimizer") != args.optimizer:
            raise CheckpointError(f"{folder} holds no {args.optimizer} optimizer state (saved: "
                                  f"{saved.get('optimizer') if saved.get('has_optimizer_state') else 'none'}); "
                                  f"resume with --no-load-optim to start the optimizer afresh")
        load_optimizer_state(folder, ctx.model, ctx.optimizer, ctx.opts, state_keys(args.optimizer, args.sgd_momentum))
        set_optimizer_step_count(ctx.optimizer, saved["optimizer_step"])
    same_layout = saved["layout"] == _layout()
    if not args.no_load_rng:
        if same_layout:
            _set_rng_state(load_pt(folder / "rng" / f"rank_{_rank():05d}.pt"))
        else:
            ctx.report(f"layout changed from {saved['layout']} to {_layout()}: RNG states are seeded from --seed, "
                       f"not loaded (pass --no-load-rng to silence this)")
    ctx.resumed_from = (folder, saved)
    ctx.report(f"resumed {folder}: iteration {state.iteration}, {state.consumed_samples} consumed samples")
    return state


def loader_state_for_rank(folder: Path, saved: dict, dp_rank: int, dp_size: int) -> Optional[dict]:
    """The loader state this DP rank resumes from. Same DP size: its own; another one (unpacked
    only): the global position, with the bad-sample counters carried on DP rank 0."""
    path = folder / "loader" / f"dp_{dp_rank:03d}.json"
    if saved["layout"]["data_parallel_size"] == dp_size:
        return json.loads(path.read_text()) if path.is_file() else None
    if saved.get("pack_sequences"):
        raise CheckpointError(f"{folder} was trained with --pack-sequences at data-parallel size "
                              f"{saved['layout']['data_parallel_size']}; resume at the same size (now {dp_size}): "
                              f"each rank packs its own slice")
    first = json.loads((folder / "loader" / "dp_000.json").read_text())
    return {"consumed_samples": first["consumed_samples"], **({"stats": first["stats"]} if dp_rank == 0 else {})}
