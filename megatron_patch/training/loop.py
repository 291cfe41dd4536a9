"""The training loop: iterations, logging, evaluation and checkpoints on their intervals.

    ctx = build_training(args)          # build.py
    pretrain(ctx)                       # this file

Each iteration is step.py's `next_batches` + `train_step`; interval_meter.py turns what a log line
covers into the metrics record.
"""
from __future__ import annotations

import time

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_patch.training.checkpointing import save_checkpoint
from megatron_patch.training.errors import TrainingStopped
from megatron_patch.training.interval_meter import IntervalMeter
from megatron_patch.training.metrics import MetricsWriter, format_validation_line
from megatron_patch.training.step import evaluate, next_batches, sum_over_world, train_step
from megatron_patch.training.stopping import StopConditions


def _is_reporting_rank() -> bool:
    """The last stage's first rank: it holds the loss."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _bad_samples(ctx) -> int:
    mine = ctx.train_loader.snapshot()["bad"] if ctx.train_loader is not None else 0
    return int(sum_over_world(torch.tensor([mine], dtype=torch.int64, device=ctx.device)))


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
