"""Per-rank bodies of the layout planner's tests (run on gloo ranks by the distributed harness)."""
from __future__ import annotations

import contextlib
import io
import logging
import torch
from megatron.core import parallel_state as ps

from megatron_patch.models.idefics2.config import ParallelOptions, validate_layout
from megatron_patch.platform import get_device, init_distributed

logging.getLogger("megatron").setLevel(logging.ERROR)


def counted_params_case(config_name: str, layouts: list) -> dict:
    """{(tp, pp): parameters counted once over every part, or the refusal line} and the HF count."""
    from megatron_patch.models.idefics2.reference_configs import reference_config
    from megatron_patch.planning.census import census, hf_parameter_count

    config = reference_config(config_name)
    out = {"hf": hf_parameter_count(config)}
    for tp, pp in layouts:
        opts = ParallelOptions(tp, pp)
        try:
            validate_layout(config, opts)
        except ValueError as err:
            out[(tp, pp)] = str(err)
            continue
        out[(tp, pp)] = sum(sum(part.owned.values()) for part in census(config, opts).values())
    return out


def optimizer_args(distributed: bool, bf16: bool, optimizer: str = "adam", lr: float = 1e-4):
    """The training flags `wrap_ddp` / `build_optimizer` read: the parser's defaults (so flags added
    later come with theirs) with these optimizer settings, as `parse_args` would leave them."""
    from megatron_patch.training.arguments import build_parser

    args = build_parser().parse_args(["--micro-batch-size", "1", "--seq-length", "8"])
    args.__dict__.update(
        use_distributed_optimizer=distributed, bf16=bf16, accumulate_allreduce_grads_in_fp32=True,
        optimizer=optimizer, lr=lr, min_lr=lr, weight_decay=0.0, sgd_momentum=0.0, clip_grad=0.0,
        overlap_grad_reduce=False,
    )
    return args


def _held_state_bytes(ddp, optimizer) -> dict:
    """Weights, gradients and optimizer state this rank holds, counted from the tensors themselves."""
    from megatron_patch.training.optimizer import sub_optimizers

    buffers = list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", []))
    buffered = {id(p) for b in buffers for p in b.params}
    weights = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if id(p) not in buffered)
    weights += sum((b.param_data if b.param_data is not None else torch.cat([p.detach().view(-1) for p in b.params])).numel()
                   * b.param_dtype.itemsize for b in buffers)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    optim = 0
    for opt in sub_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            optim += sum(t.numel() * t.element_size() for g in getattr(opt, attr, []) for t in g)
        for state in opt.optimizer.state.values():
            optim += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
    return {"weights": weights, "grads": grads, "optimizer": optim}


def state_bytes_case(tp: int, pp: int, distributed: bool, bf16: bool, frozen=(), text: str = "mistral", tied: bool = False):
    """(held, planned) state bytes of this rank: a tiny model built, frozen, wrapped in DDP and given its
    optimizer by the training code, one Adam step taken (state is created lazily); and the planner's
    figure for the same (stage, TP rank, DP rank)."""
    from megatron_patch.models.idefics2.model import build_model
    from megatron_patch.planning.census import census
    from megatron_patch.planning.state_memory import state_bytes
    from megatron_patch.testing.tiny import tiny_idefics2_config
    from megatron_patch.training.freezing import freeze
    from megatron_patch.training.optimizer import build_optimizer, optimizer_step, wrap_ddp

    init_distributed(tp, pp, seed=1)
    config = tiny_idefics2_config(text, tie_word_embeddings=tied)
    opts = ParallelOptions(tp, pp, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    model = build_model(config, opts)
    freeze(model, frozen)
    args = optimizer_args(distributed, bf16)
    ddp = wrap_ddp(model, args)
    optimizer = build_optimizer(ddp, args)
    optimizer_step(optimizer, True, 0.0, get_device())
    held = _held_state_bytes(ddp, optimizer)
    stage, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    part = census(config, opts, frozen)[(stage, tp_rank)]
    planned = state_bytes(part, dp, bf16, distributed, dp_rank=dp_rank)
    return held, {"weights": planned.weights, "grads": planned.grads, "optimizer": planned.optimizer}


def activation_case(config_name: str, seq: int, recompute, frozen=()) -> tuple[float, float]:
    """(measured, estimated) MiB of one fp32 training step's activations at TP1 x PP1: the peak of live
    tensor bytes above those alive before the step (bench_train_step's allocator-event method), with
    the model in megatron-core DDP so gradients land in its preallocated buffer, as in training."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from bench.bench_train_step import bench_config, make_batch, our_loss, peak_live_tensors_mib
    from megatron_patch.models.idefics2.model import build_model
    from megatron_patch.planning.activations import Workload, estimate
    from megatron_patch.testing.tiny import tiny_idefics2_config
    from megatron_patch.training.freezing import freeze

    init_distributed(1, 1, seed=1)
    config = tiny_idefics2_config() if config_name == "tiny" else bench_config(config_name)
    full = recompute == "full"
    opts = ParallelOptions(1, 1, recompute_granularity=recompute, recompute_method="uniform" if full else None,
                           recompute_num_layers=1 if full else None)
    model = build_model(config, opts)
    freeze(model, frozen)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    batch = make_batch(config, seq)  # 2 rows, one full-size image each

    def step():
        our_loss(ddp, batch).backward()

    step()  # first step: lazily created buffers are not activations
    measured = peak_live_tensors_mib(step)
    rows = batch["input_ids"].shape[0]
    estimated = estimate(config, opts, 0, Workload(rows, seq), bytes_per_element=4, frozen=frozen).total / 2**20
    return measured, estimated


def cli_case(argv: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `toolkits/plan_layout.py` run in this rank's process."""
    from toolkits import plan_layout as module

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()
