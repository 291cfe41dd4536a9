"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, for the local layer specs.

A drop-in for megatron-core's unfused `DotProductAttention` (same constructor and `forward`, inputs
[s, b, heads, dim] per TP rank, output [s, b, heads * dim]) that never builds the score matrix itself:
SDPA picks a fused kernel (flash / memory-efficient on CUDA, a blocked flash kernel on CPU) and keeps
only blocks of scores alive. The numbers are those of the unfused path:

- causal self-attention without an explicit mask: `is_causal=True` (no `[s, s]` mask is made);
- grouped-query attention: `enable_gqa=True`, so K/V are not repeated per query head;
- an explicit megatron-core mask (bool, True = masked; [b, 1, 1, s] key padding for the vision tower,
  [b, 1, s, s] block-diagonal causal for packed rows) becomes SDPA's keep-mask (True = attend).

The unfused path fills masked scores with -10000 rather than -inf; the two agree except on a query row
whose every key is masked, which none of this model's masks produce (a vision image has at least one
real patch; a packed token always sees itself).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

# `enable_gqa` arrived in torch 2.5; older torch repeats K/V per query head as the unfused path does.
_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def keep_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """megatron-core mask (bool, True = masked) -> SDPA's boolean mask (True = attend)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"SDPA core attention expects megatron-core's boolean attention mask (True = masked), "
            f"got dtype {attention_mask.dtype}"
        )
    return ~attention_mask


class SDPAttention(MegatronModule):
    """megatron-core core attention (`DotProductAttention`'s interface) computed by torch SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "--context-parallel-size > 1 needs transformer-engine attention; "
                "use --transformer-impl transformer_engine or --context-parallel-size 1"
            )
        if getattr(config, "window_size", None) is not None:
            raise ValueError("sliding-window attention (config.window_size) is not supported by the SDPA core attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} is not supported by the SDPA core attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)

        # With apply_query_key_layer_scaling the unfused path divides the scale by the layer number and
        # multiplies it back inside its softmax: the net scale is the same.
        self.softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None else softmax_scale
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def _shape_check(self, query: torch.Tensor, key: torch.Tensor) -> None:
        heads, groups = query.shape[2], key.shape[2]
        if heads != self.num_attention_heads_per_partition or heads % groups != 0:
            raise ValueError(
                f"SDPA core attention got {heads} query heads and {groups} key/value heads per TP rank; "
                f"expected {self.num_attention_heads_per_partition} query heads in groups of equal size"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise ValueError(
                "SDPA core attention takes packed rows as an explicit block-diagonal attention mask, "
                "not as packed_seq_params (THD)"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the SDPA core attention")
        self._shape_check(query, key)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        # As megatron-core's softmax: a causal mask is made only when none is given and sq > 1
        # (sq == 1 is a decoding step that sees every cached key).
        is_causal = mask_type == AttnMaskType.causal and attention_mask is None and sq > 1
        if is_causal and sq != sk:
            raise ValueError(f"causal self-attention needs as many queries as keys, got {sq} and {sk}")

        # [s, b, h, d] -> [b, h, s, d] (views; SDPA accepts the strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = {}
        if q.shape[1] != k.shape[1]:
            if _HAS_ENABLE_GQA:
                gqa = {"enable_gqa": True}
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=keep_mask(attention_mask),
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=None,
                **gqa,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as the unfused path: TP ranks hold different heads, so they drop differently.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, h, sq, d] -> [sq, b, h * d]
        return context.permute(2, 0, 1, 3).reshape(sq, context.shape[0], self.hidden_size_per_partition)
