"""What a log line covers since the previous one: loss, tokens, FLOPs, time -> the metrics record.

Each iteration only adds to local sums (`add`: Python numbers, no collective, nothing read from a
device); they are additive, so the one reduction over the ranks happens when a line is logged (`record`).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megatron_patch.training import loss as loss_lib
from megatron_patch.training.flops import BatchShapes, device_name, mfu, peak_tflops, training_flops
from megatron_patch.training.micro_batches import MicroBatchStream
from megatron_patch.training.optimizer import StepResult
from megatron_patch.training.step import sum_over_world


class IntervalMeter:
    """Sums what a log line covers since the previous one, and turns it into the metrics."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.peak = ctx.settings.logging.peak_tflops or peak_tflops(device_name())
        self.reset()

    def reset(self) -> None:
        self.start, self.iterations = time.perf_counter(), 0
        self.loss_sum, self.loss_tokens = 0.0, 0.0  # of the finite iterations (float64, as Python floats)
        self.text_tokens = 0  # what this rank loaded (0 on ranks that load nothing)
        self.shapes = BatchShapes(0, self.ctx.settings.schedule.seq_length)

    def add(self, step: StepResult, micro: MicroBatchStream) -> None:
        """One iteration: its loss (already reduced, train_step) and what this rank loaded for it."""
        self.iterations += 1
        self.text_tokens += micro.text_tokens
        self.shapes = self.shapes + micro.shapes
        if math.isfinite(loss_lib.per_token(step.loss_sum, step.loss_tokens)):
            self.loss_sum += step.loss_sum
            self.loss_tokens += step.loss_tokens

    def _totals(self) -> tuple[int, float]:
        """(non-pad tokens, training FLOPs) since the last line, over every loading rank: one reduction.
        The FLOP count is linear in the shapes' sums, so the interval's sum is counted at once."""
        counts = torch.cat([torch.tensor([self.text_tokens]), self.shapes.to_tensor()]).to(self.ctx.device)
        counts = sum_over_world(counts).cpu()
        shapes = BatchShapes.from_tensor(counts[1:], self.shapes.seq_length)
        logging = self.ctx.settings.logging
        return int(counts[0]), training_flops(self.ctx.hf_config, shapes, logging.frozen, adapted=logging.adapted)

    def record(self, iteration: int, step: StepResult, state, bad_samples: int) -> dict:
        """The metrics line of `iteration` (every rank calls it: the totals are reduced here)."""
        tokens_seen, flops = self._totals()
        seconds = max(time.perf_counter() - self.start, 1e-9)
        per_iteration = seconds / max(self.iterations, 1)
        world = dist.get_world_size() if dist.is_initialized() else 1
        loss_sum, tokens = self.loss_sum, self.loss_tokens
        record = {
            "iteration": iteration,
            "consumed_samples": state.consumed_samples,
            "lm_loss": loss_lib.per_token(loss_sum, tokens),
            "grad_norm": step.grad_norm,
            "lr": self.ctx.scheduler.get_lr({}),  # the schedule's value (a stage may hold no parameter group)
            "loss_scale": step.loss_scale,
            "skipped_iterations": state.skipped_iterations,
            "nan_iterations": state.skipped_iterations,  # one counter: a NaN/Inf is what skips
            "bad_samples": bad_samples,
            "tokens_per_second": tokens_seen / seconds,
            "tflops_per_device": flops / seconds / world / 1e12,
            "mfu": mfu(flops, seconds, world, self.peak),
            "elapsed_ms_per_iteration": 1000.0 * per_iteration,
            "time_left_seconds": per_iteration * (self.ctx.settings.schedule.train_iters - iteration),
        }
        self.reset()
        return record
