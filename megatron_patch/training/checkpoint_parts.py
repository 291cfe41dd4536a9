"""The parts of a run's state in a training checkpoint, each saving and loading its own files.

    iter_0000100/train_state.json              what every part records (rank 0 writes it): progress,
                                               the LR schedule's state, the layout, seed, optimizer
    iter_0000100/mp_rank_TT_PPP/model-*.safetensors     model weights (checkpoint/saving.py)
    iter_0000100/mp_rank_TT_PPP/optimizer-dpRRR.safetensors
                                               optimizer state in model space, one file per DP rank
                                               (checkpoint/optimizer_parts.py), unless --no-save-optim
    iter_0000100/loader/dp_RRR.json            each DP rank's `loader.state_dict()`
    iter_0000100/rng/rank_RRRRR.pt             each rank's python / numpy / torch / megatron RNG states

A part has four steps, all optional: `prepare()` on every rank before a save (the only place for
collectives), `record()` (what it adds to train_state.json), `snapshot(copy)` (the writer of this
rank's files, no collectives: a rank that failed writing skips the rest; with `copy`, of host copies
taken now, which an asynchronous save writes on a thread while training goes on), and
`load(folder, saved)` on resume, with `saved` the train_state.json read back.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_patch.checkpoint import CheckpointError, ShardedCheckpoint, load_pt, rank_dir_name
from megatron_patch.checkpoint.commit import world_rank
from megatron_patch.checkpoint.layout import write_durable
from megatron_patch.checkpoint.optimizer_parts import OptimizerPartsReader, write_part
from megatron_patch.models.idefics2.model_loading import stage_mappings
from megatron_patch.training.optimizer import finish_param_gather
from megatron_patch.training.optimizer_state import (
    local_state_pieces,
    materialize_state,
    optimizer_step_count,
    param_state_views,
    set_optimizer_step_count,
    sharded,
    state_keys,
    trainable_parameters,
)
from megatron_patch.training.settings import CheckpointSettings

# Schedule settings a resume must not change silently (Megatron-LM refuses them too).
_SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style"}


def layout() -> dict:
    """This run's (TP, PP, DP) as train_state.json records it."""
    return {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size()}


class Part:
    """No-op steps; a part overrides those it needs."""

    def prepare(self) -> None:
        pass

    def record(self) -> dict:
        return {}

    def snapshot(self, copy: bool) -> Callable[[Path], None]:
        return lambda staging: None

    def load(self, folder: Path, saved: dict) -> None:
        pass


@dataclass
class TrainState:
    """Progress of a run (what `train_state.json` holds besides the schedule)."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # iterations whose loss or gradients were NaN/Inf: no update


class Progress(Part):
    def __init__(self, state: TrainState):
        self.state = state

    def record(self) -> dict:
        return asdict(self.state)

    def load(self, folder: Path, saved: dict) -> None:
        self.state.iteration, self.state.consumed_samples = saved["iteration"], saved["consumed_samples"]
        self.state.skipped_iterations = saved["skipped_iterations"]


class RunIdentity(Part):
    """What a resume must match (the seed: the data order and augmentations follow it), and what it
    continues (the Weights & Biases run)."""

    def __init__(self, settings: CheckpointSettings):
        self.settings = settings
        self.wandb_run_id: Optional[str] = None

    def record(self) -> dict:
        return {"layout": layout(), "seed": self.settings.seed, "pack_sequences": self.settings.pack_sequences,
                "wandb_run_id": self.wandb_run_id}

    def load(self, folder: Path, saved: dict) -> None:
        self.wandb_run_id = saved.get("wandb_run_id")
        seed = self.settings.seed
        if saved.get("seed", seed) != seed:
            raise CheckpointError(f"--seed {seed} differs from the checkpoint's {saved['seed']}: the resumed run "
                                  f"would see another data order; resume with --seed {saved['seed']} or use --finetune")


class Schedule(Part):
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def record(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load(self, folder: Path, saved: dict) -> None:
        for key, flag in _SCHEDULE_FLAGS.items():
            ours, theirs = getattr(self.scheduler, key), saved["scheduler"].get(key, getattr(self.scheduler, key))
            if theirs != ours:
                raise CheckpointError(f"{flag} gives {ours!r} but the checkpoint was trained with {theirs!r}; "
                                      f"resume with the same value, or start a new schedule with --finetune")
        self.scheduler.load_state_dict(saved["scheduler"])


def _max_over_ranks(value: int, device) -> int:
    if not dist.is_initialized():
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box)


class OptimizerState(Part):
    """Per-parameter state in model space (optimizer_state.py) and Adam's step count."""

    def __init__(self, model, optimizer, opts, settings: CheckpointSettings, device):
        self.model, self.optimizer, self.opts, self.settings, self.device = model, optimizer, opts, settings, device
        self.keys = state_keys(settings.optimizer, settings.sgd_momentum)
        self.step = 0

    def prepare(self) -> None:
        finish_param_gather(self.model)  # --overlap-param-gather: this rank holds only its shard's updates
        # Agreed over ranks: rank 0 records it, and its own optimizer may hold nothing (all frozen).
        self.step = _max_over_ranks(optimizer_step_count(self.optimizer), self.device)

    def record(self) -> dict:
        return {"optimizer": self.settings.optimizer, "has_optimizer_state": self.settings.save_optim,
                "optimizer_step": self.step}

    def snapshot(self, copy: bool) -> Callable[[Path], None]:
        """This rank's part, written by this rank alone: its range of each flattened parameter with
        the distributed optimizer; otherwise DP rank 0 writes the whole shard (every DP rank holds it)."""
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        if not sharded(self.optimizer):
            dp_rank, dp_size = (0, 1) if dp_rank == 0 else (None, None)
        if not self.settings.save_optim or dp_rank is None:
            return lambda staging: None
        tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        name = rank_dir_name(tp, pp, parallel_state.get_pipeline_model_parallel_world_size())
        pieces = local_state_pieces(self.model, self.optimizer, self.opts, self.keys)  # views: nothing copied
        if copy:
            pieces = [(n, start, end, shape, {k: t.to("cpu", copy=True) for k, t in states.items()})
                      for n, start, end, shape, states in pieces]
        return lambda staging: write_part(staging / name, dp_rank, dp_size, pieces)

    def load(self, folder: Path, saved: dict) -> None:
        if not self.settings.load_optim:
            return
        name = self.settings.optimizer
        if not saved.get("has_optimizer_state") or saved.get("optimizer") != name:
            raise CheckpointError(f"{folder} holds no {name} optimizer state (saved: "
                                  f"{saved.get('optimizer') if saved.get('has_optimizer_state') else 'none'}); "
                                  f"resume with --no-load-optim to start the optimizer afresh")
        self._load_tensors(folder)
        set_optimizer_step_count(self.optimizer, saved["optimizer_step"])

    @torch.no_grad()
    def _load_tensors(self, folder: Path) -> None:
        """This rank's range of each parameter's state, from a checkpoint saved at any layout."""
        materialize_state(self.optimizer)
        views = param_state_views(self.optimizer, self.keys)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        mappings = None
        for key in self.keys:
            source = ShardedCheckpoint(folder, prefix=f"{key}/", reader_class=OptimizerPartsReader)
            if mappings is None:
                mappings = stage_mappings(source.hf_config, self.opts, stage, source.mappings)
            for name, param in trainable_parameters(self.model, self.opts):
                if param not in views:
                    continue  # distributed optimizer: no part of this parameter lives on this DP rank
                start, end, tensors = views[param]
                try:
                    part = source.shard_range(mappings[name], tp_rank, tp_size, start, end)
                except CheckpointError as err:
                    raise CheckpointError(f"{err}; was {name} frozen when the checkpoint was saved? resume with "
                                          f"--no-load-optim to start its optimizer state afresh") from None
                tensors[key].copy_(part.to(tensors[key].dtype))


def _save_pt(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_states() -> dict:
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


def set_rng_states(state: dict) -> None:
    *keys, version = state["python"]
    random.setstate((version, tuple(keys), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class RngStates(Part):
    """Every rank's RNG states; restored only at the same layout (elsewhere seeded from --seed)."""

    def __init__(self, settings: CheckpointSettings, report):
        self.settings, self.report = settings, report

    def snapshot(self, copy: bool) -> Callable[[Path], None]:
        states, name = rng_states(), f"rank_{world_rank():05d}.pt"  # copies, taken now

        def write(staging: Path) -> None:
            (staging / "rng").mkdir(exist_ok=True)
            _save_pt(states, staging / "rng" / name)
        return write

    def load(self, folder: Path, saved: dict) -> None:
        if not self.settings.load_rng:
            return
        if saved["layout"] == layout():
            set_rng_states(load_pt(folder / "rng" / f"rank_{world_rank():05d}.pt"))
        else:
            self.report(f"layout changed from {saved['layout']} to {layout()}: RNG states are seeded from --seed, "
                        f"not loaded (pass --no-load-rng to silence this)")


class LoaderState(Part):
    """Each DP rank's training loader position (written by its TP rank 0 of the first stage)."""

    def __init__(self):
        self.loader = None  # the training loader, once built (loading ranks only)
        self.resume_state: Optional[dict] = None  # what the loader starts from, read on resume

    def snapshot(self, copy: bool) -> Callable[[Path], None]:
        if self.loader is None:
            return lambda staging: None
        text, name = json.dumps(self.loader.state_dict()), f"dp_{parallel_state.get_data_parallel_rank():03d}.json"

        def write(staging: Path) -> None:
            (staging / "loader").mkdir(exist_ok=True)
            write_durable(staging / "loader" / name, text)
        return write

    def load(self, folder: Path, saved: dict) -> None:
        """Same DP size: this rank's own state; another one (unpacked only): the global position,
        with the bad-sample counters carried on DP rank 0."""
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        path = folder / "loader" / f"dp_{dp_rank:03d}.json"
        if saved["layout"]["data_parallel_size"] == dp_size:
            self.resume_state = json.loads(path.read_text()) if path.is_file() else None
            return
        if saved.get("pack_sequences"):
            raise CheckpointError(f"{folder} was trained with --pack-sequences at data-parallel size "
                                  f"{saved['layout']['data_parallel_size']}; resume at the same size (now {dp_size}): "
                                  f"each rank packs its own slice")
        first = json.loads((folder / "loader" / "dp_000.json").read_text())
        self.resume_state = {"consumed_samples": first["consumed_samples"],
                             **({"stats": first["stats"]} if dp_rank == 0 else {})}
