"""One iteration's work: micro-batches in, megatron-core's schedule, the guarded optimizer step.

An iteration takes `num_microbatches` fixed-shape micro-batches from this DP rank's loader, runs
megatron-core's schedule (1F1B when PP > 1) with the per-token loss (loss.py), takes the guarded
optimizer step (optimizer.py) and steps the LR schedule; evaluation runs the same schedule forward only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.data.image_processing import normalise_pixels
from megatron_patch.data.packing import packed_seq_params
from megatron_patch.training import loss as loss_lib
from megatron_patch.training.batch_transport import broadcast_count, distribute
from megatron_patch.training.flops import BatchShapes
from megatron_patch.training.optimizer import optimizer_step, params_gathered


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


def sum_over_world(values: torch.Tensor) -> torch.Tensor:
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
