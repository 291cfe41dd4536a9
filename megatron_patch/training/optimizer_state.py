"""What a megatron-core optimizer holds, seen per model parameter: the state a checkpoint saves.

Each trainable parameter's fp32 main weight and moments (Adam: `exp_avg`, `exp_avg_sq`; SGD:
`momentum_buffer`) as flat views of the range this rank's optimizer holds (all of it, or a range of
the flattened parameter with the distributed optimizer), under the parameter's canonical name; and
Adam's step count wherever the optimizer keeps it. The checkpoint part that saves and loads them is
`training/checkpoint_parts.OptimizerState`: saved under the state as prefix
(`exp_avg/language_model.decoder.layers.0...`), one file per DP rank, no collective and no gathered
copy; loaded through the weight mapping from any (TP, PP, DP) layout.
"""
from __future__ import annotations

import torch

from megatron_patch.models.idefics2.layer_specs import module_to_canonical_name
from megatron_patch.models.idefics2.model_loading import unwrap
from megatron_patch.training.optimizer import sub_optimizers


def state_keys(optimizer_name: str, sgd_momentum: float) -> tuple[str, ...]:
    """The per-parameter tensors saved for an optimizer ("param" is the fp32 main weight)."""
    if optimizer_name == "adam":
        return ("param", "exp_avg", "exp_avg_sq")
    return ("param", "momentum_buffer") if sgd_momentum else ("param",)


def _main_param_map(opt) -> dict:
    """model parameter -> the optimizer's main (fp32) parameter, for non-distributed optimizers."""
    if hasattr(opt, "float16_groups"):  # bf16: fp32 copies of the bf16 weights, fp32 ones as they are
        pairs = {}
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            pairs.update(zip(model_group, main_group))
        for group in opt.fp32_from_fp32_groups:
            pairs.update((p, p) for p in group)
        return pairs
    return {p: p for group in opt.optimizer.param_groups for p in group["params"]}


def param_state_views(optimizer, keys) -> dict:
    """model parameter -> (start, end, {key: flat tensor}) of the part this rank's optimizer holds
    (the whole parameter unless the optimizer is distributed). Views: writing them sets the state."""
    views = {}
    for opt in sub_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.optimizer is None:
            continue
        if hasattr(opt, "model_param_group_index_map"):  # DistributedOptimizer
            for param in opt.model_param_group_index_map:
                rng = opt._get_model_param_range_map(param)["param"]
                tensors = opt._get_main_param_and_optimizer_states(param)
                views[param] = (rng.start, rng.end, {k: tensors[k].view(-1) for k in keys})
        else:
            for param, main in _main_param_map(opt).items():
                state = opt.optimizer.state[main]
                tensors = {"param": main, **state}
                views[param] = (0, param.numel(), {k: tensors[k].view(-1) for k in keys})
    return views


@torch.no_grad()
def materialize_state(optimizer) -> None:
    """Create the optimizer's state tensors (torch creates them lazily at the first step) with a
    step of learning rate 0 on zero gradients; the values are then overwritten by a load. The zero
    gradients are views of one buffer per dtype and device (the optimizers only read them), so this
    costs the largest parameter, not a second copy of them all."""
    for inner in _torch_optimizers(optimizer):
        lrs = [g["lr"] for g in inner.param_groups]
        params = [p for group in inner.param_groups for p in group["params"]]
        zeros = {}
        for p in params:
            zeros[(p.dtype, p.device)] = max(zeros.get((p.dtype, p.device), 0), p.numel())
        zeros = {key: torch.zeros(n, dtype=key[0], device=key[1]) for key, n in zeros.items()}
        for group in inner.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = zeros[(p.dtype, p.device)][: p.numel()].view_as(p)
        inner.step()
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr
            for p in group["params"]:
                p.grad = None


def _torch_optimizers(optimizer):
    """The torch optimizers inside `optimizer` (none on a rank with nothing to train)."""
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not getattr(opt, "is_stub_optimizer", False):
            yield inner


def _step_holders(optimizer):
    """Every dict that holds Adam's step: torch's Adam keeps it per parameter (`state[p]["step"]`),
    transformer-engine's and apex's FusedAdam in the param group (`group["step"]`, which megatron-core
    builds whenever either imports). Both are read and written, whichever the optimizer uses."""
    for inner in _torch_optimizers(optimizer):
        yield from (group for group in inner.param_groups if group["params"])
        yield from inner.state.values()


def optimizer_step_count(optimizer) -> int:
    """Adam's step counter (the same for every parameter: all trainable parameters step together);
    0 on a rank whose optimizer has not stepped or holds nothing."""
    return max((int(holder["step"]) for holder in _step_holders(optimizer) if "step" in holder), default=0)


@torch.no_grad()
def set_optimizer_step_count(optimizer, step: int) -> None:
    """Set the counter where the optimizer keeps it, in its own type and device (an int, or a tensor
    on the CPU or, for capturable/fused optimizers, on the GPU)."""
    for holder in _step_holders(optimizer):
        if "step" in holder:
            if torch.is_tensor(holder["step"]):
                holder["step"].fill_(step)
            else:
                holder["step"] = step


def trainable_parameters(model, opts) -> list:
    """(canonical local name, parameter) of this rank's trainable parameters, in a stable order."""
    named = [(module_to_canonical_name(n, opts.uses_transformer_engine()), p)
             for n, p in unwrap(model).named_parameters() if p.requires_grad]
    return sorted(named, key=lambda item: item[0])


def local_state_pieces(model, optimizer, opts, keys):
    """[(canonical local name, start, end, shape, {key: flat view})] of what this rank's optimizer
    holds, in a stable order (views into the optimizer's state: nothing is copied)."""
    views = param_state_views(optimizer, keys)
    pieces = []
    for name, param in trainable_parameters(model, opts):
        start, end, tensors = views.get(param, (0, 0, {}))
        if end > start:
            pieces.append((name, start, end, tuple(param.shape), {k: tensors[k].detach() for k in keys}))
    return pieces


def sharded(optimizer) -> bool:
    """True with the distributed optimizer: each DP rank holds a range of each flattened parameter."""
    return any(hasattr(opt, "model_param_group_index_map") for opt in sub_optimizers(optimizer))
