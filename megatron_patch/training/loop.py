"""The training loop: iterations, logging, evaluation and checkpoints on their intervals.

    ctx = build_training(args)          # build.py
    pretrain(ctx)                       # this file

Each iteration is `train_step` (step.py) over `micro_batches` (micro_batches.py); interval_meter.py
turns what a log line covers into the metrics record; the checkpointer decides when to save.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_patch.training.errors import TrainingStopped
from megatron_patch.training.interval_meter import IntervalMeter
from megatron_patch.training.metrics import MetricsWriter, format_validation_line
from megatron_patch.training.micro_batches import micro_batches
from megatron_patch.training.step import evaluate, sum_over_world, train_step
from megatron_patch.training.stopping import StopConditions
from megatron_patch.training.wandb_run import WandbRun, run_config


def _is_reporting_rank() -> bool:
    """The last stage's first rank: it holds the loss."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _bad_samples(ctx) -> int:
    mine = ctx.train_loader.snapshot()["bad"] if ctx.train_loader is not None else 0
    return int(sum_over_world(torch.tensor([mine], dtype=torch.int64, device=ctx.device)))


def _metrics_writer(ctx) -> MetricsWriter:
    log, reporting = ctx.settings.logging, _is_reporting_rank()
    wandb = WandbRun(log, ctx.wandb_run_id, run_config(ctx.args)) if log.wandb_project and reporting else None
    return MetricsWriter(log.metrics_jsonl, log.tensorboard_dir, reporting, ctx.settings.schedule.train_iters, wandb)


def run_evaluation(ctx, writer, iteration: int) -> dict:
    ctx.report(f"evaluating at iteration {iteration}")
    result = {"iteration": iteration, **evaluate(ctx)}
    writer.write(result, format_validation_line(result))
    return result


def pretrain(ctx) -> dict:
    """Train from ctx.state to --train-iters, or until a stop (stopping.py: signal, duration, interval;
    that iteration is saved, no final evaluation), or evaluate only with --skip-train; returns the
    last training record (or the evaluation result) on every rank that has it."""
    schedule = ctx.settings.schedule
    with _metrics_writer(ctx) as writer:
        if schedule.skip_train:
            return run_evaluation(ctx, writer, ctx.state.iteration)
        state = ctx.state
        ctx.model.train()
        ctx.report(f"training from iteration {state.iteration} to {schedule.train_iters} ({get_num_microbatches()} "
                   f"micro-batches of {schedule.micro_batch_size} per DP rank per iteration)")
        # The handler stays until the last save is done, and is in place before loader workers fork.
        with StopConditions(schedule, ctx.device, ctx.start_time) as stops:
            record, evaluated_at, stopped = _train_iterations(ctx, writer, stops)
            ctx.checkpointer.maybe_save(state.iteration, last=True)
        if stopped:
            ctx.report(f"stopped after iteration {state.iteration} of {schedule.train_iters}: {stopped}")
        elif schedule.eval_interval and evaluated_at != state.iteration:
            run_evaluation(ctx, writer, state.iteration)
        return record


def _train_iterations(ctx, writer, stops) -> tuple:
    """Iterate until --train-iters or a stop: (last record, last evaluation, stop reason)."""
    schedule, state, meter = ctx.settings.schedule, ctx.state, IntervalMeter(ctx)
    data = iter(ctx.train_loader) if ctx.train_loader is not None else None
    consecutive_bad, record, evaluated_at, stopped = 0, {}, None, None
    while state.iteration < schedule.train_iters and not stopped:
        micro = micro_batches(ctx, data)
        step = train_step(ctx, micro)
        state.iteration += 1
        state.consumed_samples += schedule.global_batch_size
        meter.add(step, micro)
        consecutive_bad = 0 if step.updated else consecutive_bad + 1
        state.skipped_iterations += 0 if step.updated else 1
        if state.iteration % ctx.settings.logging.log_interval == 0 or state.iteration == schedule.train_iters:
            record = meter.record(state.iteration, step, state, _bad_samples(ctx))
            writer.write(record)
        if consecutive_bad >= schedule.max_skipped_iterations:
            raise TrainingStopped(
                f"{consecutive_bad} consecutive iterations had NaN/Inf loss or gradients (--max-skipped-iterations "
                f"{schedule.max_skipped_iterations}); stopped at iteration {state.iteration}, the last checkpoint is "
                f"intact")
        if schedule.eval_interval and state.iteration % schedule.eval_interval == 0:
            run_evaluation(ctx, writer, state.iteration)
            evaluated_at = state.iteration
        ctx.checkpointer.maybe_save(state.iteration)
        stopped = stops.check(state.iteration)
    return record, evaluated_at, stopped
