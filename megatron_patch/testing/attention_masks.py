"""Dense attention masks that the model never builds, as references for its segment plans."""
from __future__ import annotations

import torch

from megatron_patch.models.idefics2.varlen_attention import segment_ids


def packed_causal_mask(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """megatron-core attention mask [b, 1, s, s] (True = masked) for packed rows: causal inside each
    segment of `cu_seqlens` (boundaries over the b-major flattened [b * s] tokens), nothing across.
    The dense form of `sdpa_attention.row_segments`, which the model uses; kept as its reference."""
    segment = segment_ids(cu_seqlens, batch_size * seq_len).view(batch_size, 1, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment.device).tril()
    return ~((segment.transpose(1, 2) == segment) & causal).unsqueeze(1)
