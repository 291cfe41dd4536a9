"""The torch LayerNorm / RMSNorm of the local (non-transformer-engine) layers, sequence-parallel capable.

megatron-core's own torch norm refuses --sequence-parallel. Under sequence parallelism each TP rank
normalises only its slice of the sequence, so the norm weights' gradients are partial sums over TP;
megatron-core's grad finalisation all-reduces every parameter tagged `sequence_parallel` across TP.
Tagging is the only thing this adds to torch's modules.
"""
from __future__ import annotations

from megatron.core.transformer import TransformerConfig
from torch import nn


class TorchNorm:
    """`build_module`-compatible factory: config.normalization picks torch's LayerNorm or RMSNorm."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> nn.Module:
        norm_class = {"LayerNorm": nn.LayerNorm, "RMSNorm": nn.RMSNorm}[config.normalization]
        norm = norm_class(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
