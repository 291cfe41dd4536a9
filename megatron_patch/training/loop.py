"""The training loop: one small named function per step of an iteration.

    ctx = build_training(args)          # build.py
    pretrain(ctx)                       # iterations, logging, evaluation, checkpoints

An iteration takes `num_microbatches` fixed-shape micro-batches from this DP rank's loader, runs
megatron-core's schedule (1F1B when PP > 1) with the per-token loss (loss.py), takes the guarded
optimizer step (optimizer.py), steps the LR schedule, logs, evaluates and saves on their intervals.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.data.image_processing import normalise_pixels
from megatron_patch.data.packing import packed_seq_params
from megatron_patch.training.batch_transport import broadcast_count, distribute
from megatron_patch.training import loss as loss_lib
from megatron_patch.training.arguments import frozen_components
from megatron_patch.training.checkpointing import save_checkpoint
from megatron_patch.training.errors import TrainingStopped
from megatron_patch.training.flops import BatchShapes, device_name, mfu, peak_tflops, training_flops
from megatron_patch.training.metrics import MetricsWriter, format_validation_line
from megatron_patch.training.optimizer import optimizer_step, params_gathered
from megatron_patch.training.stopping import StopConditions


def forward_step(data_iterator, model):
    """megatron-core forward step: per-token losses of one micro-batch and the loss function."""
    batch = next(data_iterator)
    packed = packed_seq_params(batch) if "cu_seqlens" in batch else None
    output = model(batch["tokens"], batch["position_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                   batch.get("image_mask"), labels=batch["labels"], packed_seq_params=packed)
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask, per_token_loss):
    return loss_lib.masked_loss_sum(per_token_loss, loss_mask)


def run_schedule(ctx, batches: list, forward_only: bool) -> list:
    """megatron-core's forward(-backward) over the micro-batches; loss reports on the last stage."""
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ctx.model],
        num_microbatches=len(batches), seq_length=ctx.args.seq_length,
        micro_batch_size=ctx.args.micro_batch_size, forward_only=forward_only,
    )


@dataclass
class StepResult:
    loss_sum: float
    loss_tokens: float
    grad_norm: float
    updated: bool
    loss_scale: float


def _sum_over_world(values: torch.Tensor) -> torch.Tensor:
    """Totals over the loading ranks (one per model replica; the others contribute zeros)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


@dataclass
class MicroBatches:
    batches: list  # this rank's share of each micro-batch, on its device
    text_tokens: int  # non-pad tokens this rank loaded (0 on ranks that load nothing)
    shapes: BatchShapes  # of what this rank loaded, for the FLOP count


def next_batches(ctx, data_iter, count: int | None = None) -> MicroBatches:
    """The next micro-batches: read on the loading rank, sent to the others (batch_transport)."""
    count = get_num_microbatches() if count is None else count
    batches, tokens = [], 0
    shapes = BatchShapes(0, ctx.args.seq_length)
    for _ in range(count):
        raw = next(data_iter) if data_iter is not None else None
        if raw is not None:
            tokens += int(raw["attention_mask"].sum())
            shapes = shapes + BatchShapes.from_batch(raw, ctx.hf_config.vision_config.patch_size)
        batches.append(_float_pixels(distribute(raw, ctx.device)))
    return MicroBatches(batches, tokens, shapes)


def _float_pixels(batch: dict) -> dict:
    """The loader's uint8 pixels (collate's ``raw_pixels``) normalised here, on the device."""
    if "pixel_values" in batch:
        batch["pixel_values"] = normalise_pixels(batch["pixel_values"], batch["pixel_attention_mask"],
                                                 batch.pop("pixel_norm", None))
    return batch


def train_step(ctx, micro: MicroBatches) -> StepResult:
    """Zero grads, forward + backward over the micro-batches, guarded optimizer step, LR step."""
    ctx.model.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    reports = run_schedule(ctx, micro.batches, forward_only=False)
    loss_sum, tokens = loss_lib.reduce_loss(reports, ctx.device)
    loss_ok = math.isfinite(loss_lib.per_token(loss_sum, tokens)) or not parallel_state.is_pipeline_last_stage()
    outcome = optimizer_step(ctx.optimizer, loss_ok, ctx.args.clip_grad, ctx.device)
    if outcome.updated:
        ctx.scheduler.step(increment=1)
    return StepResult(loss_sum, tokens, outcome.grad_norm, outcome.updated, outcome.loss_scale)


@torch.no_grad()
def evaluate(ctx) -> dict:
    """Per-token loss over the whole validation set (or --eval-iters iterations of the global
    batch), with the training loss definition; every rank runs the same number of micro-batches."""
    with params_gathered(ctx.model):  # --overlap-param-gather: no pre-hooks while ranks' modules differ
        return _evaluate(ctx)


def _evaluate(ctx) -> dict:
    ctx.model.eval()
    loader, data = ctx.valid_loader, None
    if loader is not None:  # the loading ranks
        loader.load_state_dict({"consumed_samples": 0})
        data = iter(loader)
    steps = broadcast_count(loader.num_steps() if loader is not None else None, ctx.device)
    if ctx.args.eval_iters:
        steps = min(steps, ctx.args.eval_iters * get_num_microbatches())
    reports = []
    chunk = get_num_microbatches()
    for start in range(0, steps, chunk):
        micro = next_batches(ctx, data, min(chunk, steps - start))
        reports += run_schedule(ctx, micro.batches, forward_only=True)
    if data is not None:
        data.close()
    ctx.model.train()
    loss_sum, tokens = loss_lib.reduce_loss(reports, ctx.device)
    loss = loss_lib.per_token(loss_sum, tokens)
    return {"validation_loss": loss, "validation_ppl": math.exp(min(loss, 700.0)) if math.isfinite(loss) else loss,
            "validation_tokens": int(tokens)}


def _is_reporting_rank() -> bool:
    """The last stage's first rank: it holds the loss."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


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
        counts = _sum_over_world(counts).cpu()
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


def _bad_samples(ctx) -> int:
    mine = ctx.train_loader.snapshot()["bad"] if ctx.train_loader is not None else 0
    return int(_sum_over_world(torch.tensor([mine], dtype=torch.int64, device=ctx.device)))


def _metrics_writer(ctx) -> MetricsWriter:
    return MetricsWriter(ctx.args.metrics_jsonl, ctx.args.tensorboard_dir, _is_reporting_rank(), ctx.args.train_iters)


def run_evaluation(ctx, writer, iteration: int) -> dict:
    ctx.report(f"evaluating at iteration {iteration}")
    result = {"iteration": iteration, **evaluate(ctx)}
    writer.write(result, format_validation_line(result))
    return result


def pretrain(ctx) -> dict:
    """Train from ctx.state to --train-iters, or until a stop (stopping.py: signal, duration, interval;
    that iteration is saved, no final evaluation), or evaluate only with --skip-train; returns the
    last training record (or the evaluation result) on every rank that has it."""
    args = ctx.args
    with _metrics_writer(ctx) as writer:
        if args.skip_train:
            return run_evaluation(ctx, writer, ctx.state.iteration)
        state = ctx.state
        ctx.model.train()
        ctx.report(f"training from iteration {state.iteration} to {args.train_iters} "
                   f"({get_num_microbatches()} micro-batches of {args.micro_batch_size} per DP rank per iteration)")
        # The handler stays until the last save is done, and is in place before loader workers fork.
        with StopConditions(args, ctx.device, ctx.start_time) as stops:
            record, saved_at, evaluated_at, stopped = _train_iterations(ctx, writer, stops)
            if args.save and saved_at != state.iteration:
                _save(ctx, state)
        if stopped:
            ctx.report(f"stopped after iteration {state.iteration} of {args.train_iters}: {stopped}")
        elif args.valid_data_path and args.eval_interval and evaluated_at != state.iteration:
            run_evaluation(ctx, writer, state.iteration)
        return record


def _train_iterations(ctx, writer, stops) -> tuple:
    """Iterate until --train-iters or a stop: (last record, last save, last evaluation, stop reason)."""
    args, state, meter = ctx.args, ctx.state, IntervalMeter(ctx)
    data = iter(ctx.train_loader) if ctx.train_loader is not None else None
    consecutive_bad, record, saved_at, evaluated_at, stopped = 0, {}, None, None, None
    while state.iteration < args.train_iters and not stopped:
        micro = next_batches(ctx, data)
        step = train_step(ctx, micro)
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        meter.add(step, micro)
        if not step.updated:
            state.skipped_iterations += 1
            state.nan_iterations += 1
            consecutive_bad += 1
        else:
            consecutive_bad = 0
        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            record = meter.record(state.iteration, step, state, _bad_samples(ctx))
            writer.write(record)
        if consecutive_bad >= args.max_skipped_iterations:
            raise TrainingStopped(
                f"{consecutive_bad} consecutive iterations had NaN/Inf loss or gradients (--max-skipped-iterations "
                f"{args.max_skipped_iterations}); stopped at iteration {state.iteration}, the last checkpoint is intact")
        if args.eval_interval and args.valid_data_path and state.iteration % args.eval_interval == 0:
            run_evaluation(ctx, writer, state.iteration)
            evaluated_at = state.iteration
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            _save(ctx, state)
            saved_at = state.iteration
        stopped = stops.check(state.iteration)
    return record, saved_at, evaluated_at, stopped


def _save(ctx, state) -> None:
    ctx.report(f"saving checkpoint at iteration {state.iteration} to {ctx.args.save}")
    start = time.perf_counter()
    folder = save_checkpoint(ctx, state)
    ctx.report(f"saved {folder} in {time.perf_counter() - start:.1f} s")
