"""megatron-core DDP, optimizer and LR schedule from the flags, and the guarded optimizer step.

    model = wrap_ddp(model, args)                 # after freezing and after loading weights
    optimizer = build_optimizer(model, args)      # fp32 main weights copied from the loaded model
    scheduler = build_scheduler(optimizer, args)
    result = optimizer_step(optimizer, loss_is_finite, clip_grad, device)
    finish_param_gather(model)                    # before reading the weights outside a forward

--overlap-param-gather (distributed optimizer): the optimizer step leaves each DP rank with only
its own shard of the updated parameters; megatron-core's DDP all-gathers the rest bucket by bucket
in forward pre-hooks of the next forward (the first hook dispatches it, each finished bucket
dispatches the next). Nothing else in megatron-core 0.16.1 dispatches it for a non-interleaved
schedule, so whoever reads the weights outside a forward (a checkpoint save) calls
`finish_param_gather` first, and evaluation runs inside `params_gathered` (hooks off).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patch.models.idefics2.kv_replication import sum_copy_grads


def wrap_ddp(model, args) -> DistributedDataParallel:
    """megatron-core DDP over the trainable parameters; the per-token loss path is switched on."""
    config = model.config
    config.calculate_per_token_loss = True  # grads are divided by the global loss-token count
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/Inf steps are skipped and counted (optimizer_step)
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync if args.overlap_grad_reduce else None
    config.finalize_model_grads_func = finalize_grads
    return ddp


def finish_param_gather(model) -> None:
    """With --overlap-param-gather: complete the all-gather of the updated parameters now (a no-op
    without the flag; a repeated gather is harmless), so the model's weights are the optimizer's."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)


@contextmanager
def params_gathered(model):
    """With --overlap-param-gather, for the duration: parameters gathered and the forward pre-hooks
    off (Megatron-LM does the same around evaluation). Without grad, a text-only micro-batch skips the
    vision tower, so DP ranks would call different modules and their hooks would issue the bucket
    all-gathers in different orders: a hang or garbage under NCCL, a crash under gloo."""
    if not model.ddp_config.overlap_param_gather:
        yield
        return
    model.disable_forward_pre_hook()  # also completes the all-gather
    try:
        yield
    finally:
        model.enable_forward_pre_hook()


def finalize_grads(model_chunks, num_tokens=None, **kwargs) -> None:
    """megatron-core's grad finalisation (DP reduce, tied embedding, per-token scaling), then the sum
    over the TP ranks holding copies of one perceiver KV head (`kv_replication`)."""
    finalize_model_grads(model_chunks, num_tokens, **kwargs)
    sum_copy_grads(model_chunks)


def build_optimizer(model, args):
    """Adam or SGD through megatron-core (distributed optimizer when asked); build it after the
    weights are loaded: the fp32 main weights are copied from the model here."""
    config = OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    # No gloo groups (platform.distributed): only megatron's dp-zero checkpoint format needs them.
    return get_megatron_optimizer(config, [model], use_gloo_process_groups=False)


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """LR warmup + decay counted in iterations; constant weight decay."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters or args.train_iters or 1,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )


def sub_optimizers(optimizer) -> list:
    """The megatron-core optimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@dataclass(frozen=True)
class StepResult:
    """What one training iteration did: the guarded optimizer step (`optimizer_step`), and the loss of
    the global batch that step.train_step adds (on the last stage; elsewhere 0 tokens)."""

    updated: bool  # False: a NaN/Inf loss or gradient on some rank, no weight changed anywhere
    grad_norm: float  # over trainable parameters, TP-replicated ones once; nan when not finite
    loss_scale: float
    loss_sum: float = 0.0  # sum of per-token losses over the global batch's loss tokens
    loss_tokens: float = 0.0  # their count (the loss is loss_sum / loss_tokens, loss.per_token)


def _agree_all_ok(ok: bool, device) -> bool:
    """True only when every rank says ok (the loss is known on the last stage only)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag) == 0.0


@torch.no_grad()
def optimizer_step(optimizer, loss_is_finite: bool, clip_grad: float, device) -> StepResult:
    """Unscale, measure the grad norm, and step unless the loss or any gradient is NaN/Inf.

    megatron-core's fp32 optimizer never checks for NaN, so the check is made here for every
    precision; every rank takes the same decision, and the same grad norm (megatron-core reduces it
    over the model-parallel group, or the whole world with the distributed optimizer), so pipeline
    stages with nothing to train still step in lockstep.
    """
    found_inf = bool(optimizer.prepare_grads())
    grad_norm = float(optimizer.get_grad_norm())
    ok = _agree_all_ok(loss_is_finite and not found_inf and math.isfinite(grad_norm), device)
    scale = float(optimizer.get_loss_scale())
    if not ok:
        return StepResult(False, grad_norm if math.isfinite(grad_norm) else float("nan"), scale)
    if clip_grad > 0:
        for opt in sub_optimizers(optimizer):
            params = opt.get_parameters()
            if params and not getattr(opt, "is_stub_optimizer", False):
                # Looked up at call time: the CPU platform layer wraps it after this module is imported.
                clip_grads.clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    return StepResult(True, grad_norm, scale)
