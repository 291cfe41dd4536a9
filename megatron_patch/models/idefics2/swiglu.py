"""SwiGLU MLP for the local (torch) layers: megatron-core's MLP with a one-function gated activation.

megatron-core's unfused gated MLP splits fc1's `[..., 2f]` output with `torch.chunk` and lets
autograd run `silu(gate) * up`: it keeps `gate`, `up` and `silu(gate)` for backward, and the chunk's
backward concatenates the two gradient halves into a new `[..., 2f]` tensor (on CPU the largest
`aten::cat` of a training step, see BENCHMARKS.md). `swiglu` keeps only fc1's output and writes both
gradient halves straight into one buffer. The forward is the same `silu(gate) * up`, so the numbers
are the same; the backward recomputes silu(gate) and runs autograd's own `silu_backward` kernel (the
gradients of the unfused form, in four elementwise passes).

`bias_activation_fusion` (on with CUDA, `ParallelOptions.bias_fusions`) takes megatron-core's
compiled kernel instead, as does anything other than a bias-free gated SiLU MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        half = gate.shape[-1]
        out = torch.empty_like(x)
        torch.mul(grad, F.silu(gate), out=out[..., half:])  # d/d up = silu(gate)
        # d/d gate: autograd's own silu kernel, written into the first half (4 passes in all, not 9).
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :half])
        return out


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of `x = [gate, up]` (last dim), saving only `x` for backward."""
    return _SwiGLU.apply(x)


class SwiGLUMLP(MLP):
    """megatron-core's MLP; a bias-free gated SiLU without fusion runs through `swiglu`."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        c = self.config
        own = (c.gated_linear_unit and c.activation_func is F.silu and not c.bias_activation_fusion
               and not c.use_te_activation_func and c.activation_func_clamp_value is None
               and c.glu_linear_offset == 0.0 and per_token_scale is None)
        if not own:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))
