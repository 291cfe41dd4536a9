"""The one owner of a run's checkpoints: what is saved, when, and what a resume restores.

    checkpointer = Checkpointer(settings.checkpoint, hf_config, opts, device, report)
    checkpointer.load_weights(model)                  # --load (or a LoRA checkpoint's base), before the optimizer
    checkpointer.load_adapters(model)                 # a LoRA checkpoint's adapters, once apply_lora added them
    resumed = checkpointer.resume(model, optimizer, scheduler)   # -> Resumed(state, loader_state)
    checkpointer.attach_loader(train_loader)          # its position is saved from now on
    ...
    checkpointer.maybe_save(iteration)                # after every iteration: saves on --save-interval
    checkpointer.maybe_save(iteration, last=True)     # the end or a stop: unless just saved; waits

A save is the parts of checkpoint_parts.py (progress, run identity, LR schedule, optimizer, RNG,
loader) beside the model weights (checkpoint/saving.py), written and published by the commit
protocol (checkpoint/commit.py): staged, fsynced, renamed, tracker last, then retention. Nothing
else in training reads or writes a checkpoint folder.

With --async-save the state is copied to host memory at the save iteration and written on a
background thread while training goes on; the next `maybe_save` that finds every rank's write done
publishes it (the tracker moves then). At most one save is in flight: a new save, the end of
training and a stop wait for it. A failed background write stops training on every rank with one
line at that point, the previous checkpoint intact.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megatron_patch.checkpoint import RELEASE, CheckpointError, load_model_weights, resolve_iteration
from megatron_patch.checkpoint.commit import BackgroundSave, begin, publish, write
from megatron_patch.checkpoint.layout import write_durable
from megatron_patch.checkpoint.saving import ModelWeights
from megatron_patch.training.checkpoint_parts import (
    LoaderState,
    OptimizerState,
    Progress,
    RngStates,
    RunIdentity,
    Schedule,
    TrainState,
)
from megatron_patch.training.settings import CheckpointSettings

TRAIN_STATE_FILE = "train_state.json"


@dataclass(frozen=True)
class Resumed:
    """Everything a resume hands back: where training starts, and the training loader's state."""

    state: TrainState
    loader_state: Optional[dict] = None  # for this DP rank's loader (None: start from consumed_samples 0)
    folder: Optional[Path] = None  # the iteration folder resumed from


def _train_state_writer(record: dict) -> Callable[[Path], None]:
    """train_state.json (what every part records), written by rank 0."""
    text = json.dumps(record, indent=2) + "\n"

    def write(staging: Path) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_durable(staging / TRAIN_STATE_FILE, text)
    return write


def read_train_state(folder: Path) -> Optional[dict]:
    path = folder / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


class Checkpointer:
    def __init__(self, settings: CheckpointSettings, hf_config, opts, device, report: Callable[[str], None]):
        self.settings, self.hf_config, self.opts, self.device, self.report = settings, hf_config, opts, device, report
        self.model = None
        self.state = TrainState()
        self.loader = LoaderState()
        self.identity = RunIdentity(settings)  # holds the W&B run's id a resume continues
        self.parts: list = []
        self.saved_at: Optional[int] = None  # the iteration of the last save of this run
        self.pending: Optional[BackgroundSave] = None  # --async-save: the save being written

    def load_weights(self, model) -> None:
        """The base weights into this rank's model part (any saved layout), before DDP and the
        optimizer: --load's, or those of the base a LoRA checkpoint given to --load names."""
        s = self.settings
        if s.base_load:
            self.report(f"loading weights from {s.base_load} (iteration {s.base_iteration or 'from the tracker'})")
            load_model_weights(model, s.base_load, self.opts, iteration=s.base_iteration)

    def load_adapters(self, model) -> None:
        """A LoRA checkpoint's adapters (--load), into the adapters `apply_lora` added (any saved layout)."""
        s = self.settings
        if s.load_adapters:
            self.report(f"loading LoRA adapters from {s.load} (iteration {s.load_iteration})")
            load_model_weights(model, s.load, self.opts, iteration=s.load_iteration)

    def resume(self, model, optimizer, scheduler) -> Resumed:
        """Register the run's parts and, from --load, restore progress, schedule, optimizer, RNG and the
        loader's state. `release` and --finetune start at iteration 0 (weights only)."""
        s = self.settings
        self.model = model
        self.parts = [Progress(self.state), self.identity, Schedule(scheduler),
                      OptimizerState(model, optimizer, self.opts, s, self.device), RngStates(s, self.report),
                      self.loader]
        if not s.load:
            return Resumed(self.state)
        iteration, folder = resolve_iteration(s.load, s.load_iteration)
        saved = read_train_state(folder)
        if s.finetune or iteration == RELEASE or saved is None:
            reason = "--finetune" if s.finetune else ("release" if iteration == RELEASE else "no training state")
            self.report(f"loaded weights of {folder} ({reason}): starting at iteration 0 with 0 consumed samples")
            return Resumed(self.state)
        for part in self.parts:
            part.load(folder, saved)
        self.report(f"resumed {folder}: iteration {self.state.iteration}, "
                    f"{self.state.consumed_samples} consumed samples")
        return Resumed(self.state, self.loader.resume_state, folder)

    def attach_loader(self, loader) -> None:
        """The training loader whose position each save records (None on ranks that load nothing)."""
        self.loader.loader = loader

    def maybe_save(self, iteration: int, last: bool = False) -> Optional[Path]:
        """Save `iteration` (the progress's current one) on --save-interval, or at the end or a stop
        (`last`: unless this run saved it already; then waits until every save is committed). Every
        rank calls it after every iteration: an asynchronous save in flight is published here once
        every rank has written it."""
        s = self.settings
        if self.pending is not None and (last or self.pending.written_everywhere(self.device)):
            self._publish()
        due = s.save_interval and iteration % s.save_interval == 0
        if not s.save or not (due or last) or self.saved_at == iteration:
            return None
        folder = self.save()
        if last and self.pending is not None:
            folder = self._publish()
        return folder

    def save(self) -> Optional[Path]:
        """Everything a resume needs at the current iteration (collective: every rank calls it); the
        folder, or None when --async-save writes it in the background."""
        iteration = self.state.iteration
        if self.pending is not None:
            self._publish()  # at most one save in flight
        self.report(f"saving checkpoint at iteration {iteration} to {self.settings.save}")
        start = time.perf_counter()
        for part in self.parts:
            part.prepare()
        record = {}
        for part in self.parts:
            record.update(part.record())
        weights = ModelWeights(self.model, iteration, self.hf_config, self.opts, Path(self.settings.config_source),
                               lora=self.settings.lora)
        copy, keep = self.settings.async_save, self.settings.save_total_limit
        writers = [weights.snapshot(copy), *(p.snapshot(copy) for p in self.parts), _train_state_writer(record)]
        self.saved_at = iteration
        if copy:
            self.pending = BackgroundSave(self.settings.save, iteration, writers, [weights], keep_last=keep)
            self.report(f"copied the state of iteration {iteration} in {time.perf_counter() - start:.1f} s; "
                        f"writing it in the background")
            return None
        root, final, staging = begin(self.settings.save, iteration)
        folder = publish(root, final, staging, [weights], write(writers, staging), keep_last=keep)
        self.report(f"saved {folder} in {time.perf_counter() - start:.1f} s")
        return folder

    def _publish(self) -> Path:
        start = time.perf_counter()
        folder, self.pending = self.pending.publish(), None
        self.report(f"saved {folder} (background write committed; waited {time.perf_counter() - start:.1f} s)")
        return folder
