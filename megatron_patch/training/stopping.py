"""When training stops before --train-iters, as Megatron-LM's flags say: the exit signal
(--exit-signal-handler, --exit-signal), the wall-clock budget (--exit-duration-in-mins) and
--exit-interval. The loop asks after every iteration; a stop saves that iteration and exits 0.

    with StopConditions(settings.schedule, device, start_time) as stops:
        ...
        reason = stops.check(iteration)   # collective when the signal or the duration is watched

The signal handler only records that the signal came; the ranks then agree in one MAX all-reduce
(on the run's device: NCCL needs CUDA tensors), so every rank stops after the same iteration even
when the signal reached some of them only, or arrived in the middle of a collective or a save.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.training.settings import ScheduleSettings


class StopConditions:
    """Installs the exit signal's handler for the loop's lifetime and decides when to stop."""

    def __init__(self, schedule: ScheduleSettings, device, start_time: float):
        self.schedule, self.device, self.start_time = schedule, device, start_time
        self.signum = signal.Signals[schedule.exit_signal] if schedule.exit_signal else None
        self.received, self._previous = False, None

    def __enter__(self) -> "StopConditions":
        if self.signum is not None:
            self._previous = signal.signal(self.signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self._previous)

    def _record(self, signum, frame) -> None:
        self.received = True

    def minutes(self) -> float:
        return (time.time() - self.start_time) / 60.0

    def check(self, iteration: int) -> Optional[str]:
        """Why training stops after `iteration`, or None; the same answer on every rank."""
        duration = self.schedule.exit_duration_in_mins
        if self.signum is not None or duration is not None:
            flags = torch.tensor([self.received, duration is not None and self.minutes() > duration],
                                 dtype=torch.int32, device=self.device)
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                return f"received {self.signum.name}"
            if flags[1]:
                return f"--exit-duration-in-mins {duration} reached ({self.minutes():.1f} minutes)"
        interval = self.schedule.exit_interval
        if interval and iteration % interval == 0:
            return f"--exit-interval {interval}"
        return None
