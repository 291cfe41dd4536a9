"""What a log line covers since the previous one: loss, tokens, FLOPs, time -> the metrics record."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from megatron_patch.training import loss as loss_lib
from megatron_patch.training.arguments import frozen_components
from megatron_patch.training.flops import BatchShapes, device_name, mfu, peak_tflops, training_flops
from megatron_patch.training.step import MicroBatches, StepResult, sum_over_world


class IntervalMeter:
    """Sums what a log line covers since the previous one, and turns it into the metrics."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.peak = ctx.args.peak_tflops or peak_tflops(device_name())
        self.frozen = frozen_components(ctx.args)
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.loss = torch.zeros(2, dtype=torch.float64)
        self.tokens, self.flops = 0, 0.0

    def add(self, step: StepResult, micro: MicroBatches) -> None:
        ctx = self.ctx
        # One small reduction over the loading ranks: non-pad tokens and the shapes for the FLOP count.
        counts = torch.cat([torch.tensor([micro.text_tokens]), micro.shapes.to_tensor()]).to(ctx.device)
        counts = sum_over_world(counts).cpu()
        shapes = BatchShapes.from_tensor(counts[1:], micro.shapes.seq_length)
        self.tokens += int(counts[0])
        self.flops += training_flops(ctx.hf_config, shapes, self.frozen)
        if math.isfinite(loss_lib.per_token(step.loss_sum, step.loss_tokens)):
            self.loss += torch.tensor([step.loss_sum, step.loss_tokens], dtype=torch.float64)

    def record(self, iteration: int, step: StepResult, state, bad_samples: int) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        world = dist.get_world_size() if dist.is_initialized() else 1
        loss_sum, tokens = float(self.loss[0]), float(self.loss[1])
        record = {
            "iteration": iteration,
            "consumed_samples": state.consumed_samples,
            "lm_loss": loss_lib.per_token(loss_sum, tokens),
            "grad_norm": step.grad_norm,
            "lr": self.ctx.scheduler.get_lr({}),  # the schedule's value (a stage may hold no parameter group)
            "loss_scale": step.loss_scale,
            "skipped_iterations": state.skipped_iterations,
            "nan_iterations": state.nan_iterations,
            "bad_samples": bad_samples,
            "tokens_per_second": self.tokens / seconds,
            "tflops_per_device": self.flops / seconds / world / 1e12,
            "mfu": mfu(self.flops, seconds, world, self.peak),
        }
        self.reset()
        return record
