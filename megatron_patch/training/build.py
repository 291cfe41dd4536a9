"""Everything a run needs, built from the validated flags in the order that keeps it correct:

model part -> freeze -> load weights -> DDP -> optimizer (fp32 main weights copied from the
*loaded* weights, never from the random init) -> LR schedule -> resume state -> data loaders. The
checkpointer (checkpointer.py) loads the weights and the resume state, and saves them all later.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from transformers import Idefics2Config
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)

from megatron_patch.data.collate import Collator
from megatron_patch.data.encoder import encoder_from_settings
from megatron_patch.data.loader import ResumableLoader, build_train_valid_loaders
from megatron_patch.models.idefics2.config import ParallelOptions, describe_fusions
from megatron_patch.models.idefics2.model import build_model
from megatron_patch.platform import init_distributed
from megatron_patch.platform.compile_preflight import fusion_preflight
from megatron_patch.platform.distributed import get_device
from megatron_patch.training.batch_transport import loads_data
from megatron_patch.training.arguments import ArgumentError, frozen_components, parallel_options
from megatron_patch.training.checkpoint_parts import TrainState
from megatron_patch.training.checkpointer import Checkpointer, Resumed
from megatron_patch.training.freezing import format_parameter_table, freeze, parameter_table
from megatron_patch.training.lora import apply_lora
from megatron_patch.training.metrics import progress
from megatron_patch.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megatron_patch.training.settings import RunSettings, run_settings
from megatron_patch.training.wandb_run import new_run_id, wandb_missing


@dataclass
class TrainingContext:
    """What the loop works with on this rank (built by `build_training`)."""

    args: argparse.Namespace  # the validated flags (read while building; not written after validation)
    settings: RunSettings
    opts: ParallelOptions
    hf_config: Idefics2Config
    device: torch.device
    checkpointer: Checkpointer
    model: Optional[DistributedDataParallel] = None  # this rank's model part, DDP-wrapped
    optimizer: Optional[MegatronOptimizer] = None
    scheduler: Optional[OptimizerParamScheduler] = None
    train_loader: Optional[ResumableLoader] = None  # on the loading ranks only (batch_transport.loads_data)
    valid_loader: Optional[ResumableLoader] = None
    resumed: Resumed = field(default_factory=lambda: Resumed(TrainState()))
    wandb_run_id: Optional[str] = None  # --wandb-project: the W&B run (kept in checkpoints)
    start_time: float = field(default_factory=time.time)  # --exit-duration-in-mins counts from here

    @property
    def state(self) -> TrainState:
        """The run's progress (iteration, consumed samples, skipped iterations), saved by the checkpointer."""
        return self.resumed.state

    def report(self, message: str) -> None:
        progress(message)


def _check_image_seq_len(encoder, hf_config) -> None:
    latents = hf_config.perceiver_config.resampler_n_latents
    if encoder.image_seq_len != latents:
        raise ArgumentError(f"--image-seq-len {encoder.image_seq_len} does not match the model's "
                         f"{latents} perceiver latents per image; drop the flag or set it to {latents}")


def build_data(ctx: TrainingContext) -> None:
    """Loaders on the ranks that load (TP rank 0 of the first stage); see batch_transport."""
    if not loads_data():
        return
    settings = ctx.settings.data
    encoder = encoder_from_settings(settings, ctx.args.tokenizer_dir)
    _check_image_seq_len(encoder, ctx.hf_config)
    # Raw (uint8) pixels, normalised per micro-batch on the device (micro_batches.py); the <image>
    # counts per row come with the batch, so the model checks them without reading the device.
    collate = Collator(settings.seq_length, encoder.pad_token_id, raw_pixels=True,
                       image_token_id=ctx.hf_config.image_token_id)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    train, valid = build_train_valid_loaders(settings, encoder, collate, dp_rank, dp_size,
                                             consumed_samples=ctx.state.consumed_samples)
    if train is not None and ctx.resumed.loader_state is not None:
        train.load_state_dict(ctx.resumed.loader_state)
    ctx.train_loader, ctx.valid_loader = train, valid


def _check_optional_packages(args) -> None:
    """Packages a flag asks for, missing: one line now, not after the model is built."""
    if args.tensorboard_dir:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise ArgumentError(f"--tensorboard-dir needs the tensorboard package ({err}); "
                                f"pip install tensorboard, or drop the flag") from None
    if args.wandb_project and wandb_missing():
        raise ArgumentError(f"--wandb-project needs the wandb package ({wandb_missing()}); "
                            f"pip install -e '.[wandb]', or drop the flag")


def _wandb_run_id(ctx: TrainingContext) -> Optional[str]:
    """The W&B run this run logs to: the resumed checkpoint's, or a new one (rank 0's, sent to all)."""
    if not ctx.settings.logging.wandb_project:
        return None
    box = [ctx.checkpointer.identity.wandb_run_id or (new_run_id() if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(box, src=0)
    ctx.checkpointer.identity.wandb_run_id = box[0]  # saved with every checkpoint
    return box[0]


def _report_parameters(ctx: TrainingContext, model) -> None:
    table = parameter_table(model, ctx.device)
    ctx.report("parameters (summed over TP and PP ranks):\n" + format_parameter_table(table))


def build_training(args) -> TrainingContext:
    """Lay out the ranks, build model, optimizer, schedule and data; resume from --load."""
    _check_optional_packages(args)
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed,
                     timeout_minutes=args.distributed_timeout_minutes)
    opts = fusion_preflight(parallel_options(args), get_device())  # unfused when torch.compile fails here
    settings, device = run_settings(args), get_device()
    checkpointer = Checkpointer(settings.checkpoint, args.hf_config, opts, device, progress)
    ctx = TrainingContext(args=args, settings=settings, opts=opts, hf_config=args.hf_config, device=device,
                          checkpointer=checkpointer)
    ctx.report(describe_fusions(opts))
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(dist.get_rank(), None, args.global_batch_size, args.micro_batch_size,
                                     parallel_state.get_data_parallel_world_size())
    ctx.report(f"building the model at TP={args.tensor_model_parallel_size} x PP={args.pipeline_model_parallel_size}"
               f" x DP={parallel_state.get_data_parallel_world_size()}")
    model = build_model(args.hf_config, opts, init_weights=not args.load)  # loaded weights replace any init
    model.to(ctx.device)
    freeze(model, frozen_components(args))
    lora = args.lora  # LoraSettings, or None (validate_args)
    if lora is None:
        _report_parameters(ctx, model)
    checkpointer.load_weights(model)  # the base weights: adapters are added after, never loaded here
    if lora is not None:
        apply_lora(model, args, opts)
        checkpointer.load_adapters(model)  # resuming a LoRA checkpoint: its adapters
        ctx.report(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g}), dropout {lora.dropout:g}, "
                   f"on {','.join(lora.targets)}" + (f", from {args.lora_load}" if args.lora_load else ""))
        _report_parameters(ctx, model)
    ctx.model = wrap_ddp(model, args)
    if not args.skip_train:
        ctx.optimizer = build_optimizer(ctx.model, args)
        ctx.scheduler = build_scheduler(ctx.optimizer, args)
        ctx.resumed = checkpointer.resume(ctx.model, ctx.optimizer, ctx.scheduler)
    build_data(ctx)
    checkpointer.attach_loader(ctx.train_loader)
    ctx.wandb_run_id = _wandb_run_id(ctx)
    return ctx
