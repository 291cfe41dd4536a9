"""Everything a run needs, built from the validated flags in the order that keeps it correct:

model part -> freeze -> load weights -> DDP -> optimizer (fp32 main weights copied from the
*loaded* weights, never from the random init) -> LR schedule -> resume state -> data loaders.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)

from megatron_patch.data.collate import Collator
from megatron_patch.data.encoder import encoder_from_args
from megatron_patch.data.loader import build_train_valid_loaders
from megatron_patch.models.idefics2.config import describe_fusions
from megatron_patch.models.idefics2.model import build_model
from megatron_patch.platform import init_distributed
from megatron_patch.platform.compile_preflight import fusion_preflight
from megatron_patch.platform.distributed import get_device
from megatron_patch.training.batch_transport import loads_data
from megatron_patch.training.arguments import ArgumentError, frozen_components, parallel_options
from megatron_patch.checkpoint import load_model_weights
from megatron_patch.training.checkpointing import TrainState, load_training_state, loader_state_for_rank
from megatron_patch.training.freezing import format_parameter_table, freeze, parameter_table
from megatron_patch.training.metrics import progress
from megatron_patch.training.optimizer import build_optimizer, build_scheduler, wrap_ddp


@dataclass
class TrainingContext:
    args: Any
    opts: Any
    hf_config: Any
    device: Any
    model: Any = None  # the DDP-wrapped model part of this rank
    optimizer: Any = None
    scheduler: Any = None
    train_loader: Any = None
    valid_loader: Any = None
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Optional[tuple] = None
    start_time: float = field(default_factory=time.time)  # --exit-duration-in-mins counts from here

    def report(self, message: str) -> None:
        progress(message)


def _check_image_seq_len(encoder, hf_config) -> None:
    latents = hf_config.perceiver_config.resampler_n_latents
    if encoder.image_seq_len != latents:
        raise ArgumentError(f"--image-seq-len {encoder.image_seq_len} does not match the model's "
                         f"{latents} perceiver latents per image; drop the flag or set it to {latents}")


def build_data(ctx: TrainingContext) -> None:
    """Loaders on the ranks that load (TP rank 0 of the first stage); see batch_transport."""
    args = ctx.args
    if not loads_data():
        return
    encoder = encoder_from_args(args, args.tokenizer_dir)
    _check_image_seq_len(encoder, ctx.hf_config)
    collate = Collator(args.seq_length, encoder.pad_token_id, raw_pixels=True)  # normalised on the device
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    args.consumed_train_samples = ctx.state.consumed_samples
    args.train_samples = None  # endless: every rank stops at --train-iters, never on an empty loader
    train, valid = build_train_valid_loaders(args, encoder, collate, dp_rank, dp_size)
    if train is not None and ctx.resumed_from is not None:
        folder, saved = ctx.resumed_from
        loader_state = loader_state_for_rank(folder, saved, dp_rank, dp_size)
        if loader_state is not None:
            train.load_state_dict(loader_state)
    ctx.train_loader, ctx.valid_loader = train, valid


def build_training(args) -> TrainingContext:
    """Lay out the ranks, build model, optimizer, schedule and data; resume from --load."""
    if args.tensorboard_dir:
        try:
            import torch.utils.tensorboard  # noqa: F401  (fail now, not after the model is built)
        except ImportError as err:
            raise ArgumentError(f"--tensorboard-dir needs the tensorboard package ({err}); "
                                f"pip install tensorboard, or drop the flag") from None
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed,
                     timeout_minutes=args.distributed_timeout_minutes)
    opts = fusion_preflight(parallel_options(args), get_device())  # unfused when torch.compile fails here
    ctx = TrainingContext(args=args, opts=opts, hf_config=args.hf_config, device=get_device())
    ctx.report(describe_fusions(opts))
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(dist.get_rank(), None, args.global_batch_size, args.micro_batch_size,
                                     parallel_state.get_data_parallel_world_size())
    ctx.report(f"building the model at TP={args.tensor_model_parallel_size} x PP={args.pipeline_model_parallel_size}"
               f" x DP={parallel_state.get_data_parallel_world_size()}")
    model = build_model(args.hf_config, opts, init_weights=not args.load)  # loaded weights replace any init
    model.to(ctx.device)
    freeze(model, frozen_components(args))
    table = parameter_table(model, ctx.device)
    ctx.report("parameters (summed over TP and PP ranks):\n" + format_parameter_table(table))
    if args.load:
        ctx.report(f"loading weights from {args.load} (iteration {args.load_iteration or 'from the tracker'})")
        load_model_weights(model, args.load, opts, iteration=args.load_iteration)
    ctx.model = wrap_ddp(model, args)
    if not args.skip_train:
        ctx.optimizer = build_optimizer(ctx.model, args)
        ctx.scheduler = build_scheduler(ctx.optimizer, args)
        ctx.state = load_training_state(ctx)
    build_data(ctx)
    return ctx
