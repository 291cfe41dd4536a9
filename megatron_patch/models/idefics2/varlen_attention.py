"""Variable-length (packed) non-causal attention: flash-attn when installed, else torch SDPA.

Sequences are packed back to back ([total_tokens, heads, head_dim]) and delimited by `cu_seqlens`
(int32 prefix sums, flash-attn convention). The torch path gives the same numbers with a block-diagonal
mask, so no query ever attends across sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_patch.platform import accelerators


def _flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and accelerators().get("flash_attn", False)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every packed token."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] with Hq a multiple of Hkv (GQA) -> [Tq, Hq, D]."""
    if _flash_usable(q):
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=scale, causal=False
        )
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # query head h reads kv head h // rep, as in GQA
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    same_sequence = segment_ids(cu_seqlens_q, q.shape[0])[:, None] == segment_ids(cu_seqlens_k, k.shape[0])[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=same_sequence, scale=scale
    )
    return out.transpose(0, 1)
