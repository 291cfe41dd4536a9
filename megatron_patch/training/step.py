"""One iteration's work: micro-batches in, megatron-core's schedule, the guarded optimizer step.

An iteration runs megatron-core's schedule (1F1B when PP > 1) over `num_microbatches` fixed-shape
micro-batches of this DP rank, each taken from the loader and finished as the schedule reaches it
(micro_batches.py), with the per-token loss (loss.py); then the guarded optimizer step (optimizer.py)
and the LR schedule's step. Evaluation runs the same schedule forward only, on the same path.
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.training import loss as loss_lib
from megatron_patch.training.batch_transport import broadcast_count
from megatron_patch.training.metrics import perplexity
from megatron_patch.training.micro_batches import MicroBatchStream, micro_batches
from megatron_patch.training.optimizer import StepResult, optimizer_step, params_gathered


def forward_step(data_iterator, model):
    """megatron-core forward step: per-token losses of one micro-batch and the loss function. The
    micro-batch is finished when taken (micro_batches.py): transport, pixels, counts."""
    micro = next(data_iterator)
    return model(**micro.inputs), partial(_loss_func, micro.loss_mask)


def _loss_func(loss_mask, per_token_loss):
    return loss_lib.masked_loss_sum(per_token_loss, loss_mask)


def run_schedule(ctx, micro: MicroBatchStream, forward_only: bool) -> list:
    """megatron-core's forward(-backward) over the stream's micro-batches; loss reports on the last stage."""
    schedule = ctx.settings.schedule
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro, model=[ctx.model],
        num_microbatches=micro.count, seq_length=schedule.seq_length,
        micro_batch_size=schedule.micro_batch_size, forward_only=forward_only,
    )


def sum_over_world(values: torch.Tensor) -> torch.Tensor:
    """Totals over the loading ranks (one per model replica; the others contribute zeros)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def train_step(ctx, micro: MicroBatchStream) -> StepResult:
    """Zero grads, forward + backward over the micro-batches, guarded optimizer step, LR step."""
    ctx.model.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    reports = run_schedule(ctx, micro, forward_only=False)
    loss_sum, tokens = loss_lib.reduce_loss(reports, ctx.device)
    loss_ok = math.isfinite(loss_lib.per_token(loss_sum, tokens)) or not parallel_state.is_pipeline_last_stage()
    result = optimizer_step(ctx.optimizer, loss_ok, ctx.settings.schedule.clip_grad, ctx.device)
    if result.updated:
        ctx.scheduler.step(increment=1)
    return replace(result, loss_sum=loss_sum, loss_tokens=tokens)


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
    if ctx.settings.schedule.eval_iters:
        steps = min(steps, ctx.settings.schedule.eval_iters * get_num_microbatches())
    reports = []
    chunk = get_num_microbatches()
    for start in range(0, steps, chunk):
        reports += run_schedule(ctx, micro_batches(ctx, data, min(chunk, steps - start)), forward_only=True)
    if data is not None:
        data.close()
    ctx.model.train()
    loss_sum, tokens = loss_lib.reduce_loss(reports, ctx.device)
    loss = loss_lib.per_token(loss_sum, tokens)
    return {"validation_loss": loss, "validation_ppl": perplexity(loss),
            "validation_tokens": int(tokens)}
