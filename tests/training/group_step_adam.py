"""An Adam that keeps its step count in the param group, as transformer-engine's and apex's FusedAdam
do (megatron-core builds one of those whenever either imports, so every NGC container trains with it).

    with group_step_adam():            # in-process: megatron-core builds this class for 'adam'
        train(flags)
    python tests/training/group_step_adam.py ENTRY FLAGS...   # a process (torchrun's workers)

The update is Adam's (decoupled weight decay when `adam_w_mode`, megatron-core's default), written
here so the CPU suite can check that resume keeps the step wherever the optimizer stores it.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import runpy
import sys

import torch


class GroupStepAdam(torch.optim.Optimizer):
    """Adam(W) with one `group["step"]` per param group and only moments per parameter."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                 capturable=False):
        if capturable:  # megatron-core 0.17+ passes its optimizer_cuda_graph setting (off by default)
            raise ValueError("GroupStepAdam has no CUDA-graph capturable mode")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue  # as the fused optimizers: an empty group does not count steps
            group["step"] = group.get("step", 0) + 1
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            correction1, correction2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad
                if decay and self.adam_w_mode:
                    p.mul_(1 - lr * decay)
                elif decay:
                    grad = grad.add(p, alpha=decay)
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(correction2)).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / correction1)


# What megatron-core's modules bind when apex's FusedAdam imports (module, {name: value}).
_AS_WITH_APEX = (
    ("megatron.core.optimizer", {"Adam": GroupStepAdam, "USING_PYTORCH_OPTIMIZER": False}),
    ("megatron.core.optimizer.distrib_optimizer",
     {"Adam": GroupStepAdam, "HAVE_APEX_OR_TE": True, "USING_APEX_OPTIMIZER": True}),
)


@contextlib.contextmanager
def group_step_adam():
    """megatron-core builds GroupStepAdam for `--optimizer adam` inside the block, as it builds
    apex's FusedAdam where apex is installed."""
    saved = []
    for module_name, values in _AS_WITH_APEX:
        module = importlib.import_module(module_name)
        saved.append((module, {k: getattr(module, k) for k in values}))
        for name, value in values.items():
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, values in saved:
            for name, value in values.items():
                setattr(module, name, value)


def train_with_group_step_adam(flags: list):
    """`runs.train` with GroupStepAdam (a module-level function: the pooled ranks run it)."""
    from tests.training.runs import train

    with group_step_adam():
        train(flags)


if __name__ == "__main__":
    entry, sys.argv = sys.argv[1], sys.argv[1:]
    with group_step_adam():
        runpy.run_path(entry, run_name="__main__")
