"""Start-up check that torch.compile works here, before megatron-core's compiled fusions need it.

megatron-core's bias+activation and bias+dropout+add fusions are decorated with
`megatron.core.jit.jit_fuser` (torch.compile on torch >= 2.2) and compile at their first call, in
the middle of the first training step, where a missing compiler, Triton or a broken Inductor cache
would crash the run. `compile_failure` compiles one tiny function the same way (forward and
backward, on the run's device and dtype) and returns why it failed; `fusion_preflight` turns the
fusions off on every rank when any rank failed, with one line saying so:

    opts = fusion_preflight(opts, device)   # build.py, before the model is built
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist


def _tiny(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    y = x + bias  # a bias + activation + dropout-free residual, like the fusions megatron compiles
    return torch.nn.functional.silu(y) * y + x


def compile_failure(device, dtype) -> Optional[str]:
    """None when megatron-core's `jit_fuser` compiles and runs `_tiny` forward and backward; else
    `ExceptionType: first line of the message`."""
    from megatron.core import jit

    try:
        compiled = jit.jit_fuser(_tiny)
        x = torch.randn(4, 8, device=device, dtype=dtype, requires_grad=True)
        compiled(x, torch.randn(8, device=device, dtype=dtype)).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return "the compiled function gave no finite gradient"
    except Exception as err:  # compile errors come in many types (Inductor, Triton, a C++ compiler, OSError)
        lines = str(err).strip().splitlines() or [""]
        return f"{type(err).__name__}: {lines[0][:200]}"
    return None


def fusion_preflight(opts, device):
    """`opts` unchanged when its bias fusions are off or torch.compile works on every rank; otherwise
    `opts` with `bias_fusions=False` on every rank, and the first failing rank prints one line."""
    from megatron_patch.models.idefics2.config import bias_fusions_on

    if not bias_fusions_on(opts):
        return opts
    failure = compile_failure(device, opts.params_dtype)
    spread = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if spread else (0, 1)
    first = torch.tensor([float(rank if failure is not None else world)], device=device)
    if spread:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # every rank then builds the same (unfused) model
    if int(first) == world:
        return opts
    if rank == int(first):
        where = f" on rank {rank}" if rank else ""
        print(f"[megatron_patch] torch.compile preflight failed{where} ({failure}): megatron-core's bias fusions "
              "are off, training runs the unfused path (--no-bias-swiglu-fusion skips this check)", flush=True)
    return dataclasses.replace(opts, bias_fusions=False)
