"""Variable-length (packed) non-causal attention: flash-attn when installed, else torch SDPA.

Sequences are packed back to back ([total_tokens, heads, head_dim]) and delimited by `cu_seqlens`
(int32 prefix sums, flash-attn convention). The torch path scatters each sequence into a padded
batch [num_seqs, heads, max_len, head_dim] and masks the padded keys, so no query attends across
sequences and the cost grows with num_seqs x max_len_q x max_len_k, not with the square of the
packed length (a block-diagonal mask over 80 images of 793 keys would need ~20 GB of scores).
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


def _padded_index(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position within it) of every packed token."""
    seq = segment_ids(cu_seqlens, total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[seq].long()
    return seq, pos


def _pad(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, num_seqs: int, max_len: int) -> torch.Tensor:
    """[total, H, D] packed -> [num_seqs, H, max_len, D] (zeros where a sequence is shorter)."""
    out = x.new_zeros(num_seqs, max_len, *x.shape[1:])
    out[seq, pos] = x
    return out.transpose(1, 2)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     dropout_p: float = 0.0):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] with Hq a multiple of Hkv (GQA) -> [Tq, Hq, D]; `dropout_p` on the
    attention probabilities (the caller passes 0 outside training)."""
    if _flash_usable(q):
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p, softmax_scale=scale,
            causal=False,
        )
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # query head h reads kv head h // rep, as in GQA
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    n = cu_seqlens_q.numel() - 1
    seq_q, pos_q = _padded_index(cu_seqlens_q, q.shape[0])
    seq_k, pos_k = _padded_index(cu_seqlens_k, k.shape[0])
    key_lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    real_key = torch.arange(max_seqlen_k, device=q.device)[None, :] < key_lengths[:, None]  # [n, max_k]
    out = F.scaled_dot_product_attention(
        _pad(q, seq_q, pos_q, n, max_seqlen_q),
        _pad(k, seq_k, pos_k, n, max_seqlen_k),
        _pad(v, seq_k, pos_k, n, max_seqlen_k),
        attn_mask=real_key[:, None, None, :],
        dropout_p=dropout_p,
        scale=scale,
    )
    return out.transpose(1, 2)[seq_q, pos_q]
