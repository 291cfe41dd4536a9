"""Packed variable-length attention equals attention run on each sequence alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_patch.models.idefics2.varlen_attention import varlen_attention


def test_packed_attention_equals_per_sequence_attention():
    g = torch.Generator().manual_seed(0)
    q_lens, k_lens = [3, 3, 3], [7, 4, 12]
    heads, groups, dim = 4, 2, 8
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(k_lens), groups, dim, generator=g)
    v = torch.randn(sum(k_lens), groups, dim, generator=g)
    cu_q = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 11, 23], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu_q, cu_k, 3, 12, scale=dim**-0.5)

    for i in range(3):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki = k[cu_k[i] : cu_k[i + 1]].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        vi = v[cu_k[i] : cu_k[i + 1]].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        expected = F.softmax(qi @ ki.transpose(1, 2) * dim**-0.5, dim=-1) @ vi
        assert torch.allclose(out[cu_q[i] : cu_q[i + 1]].transpose(0, 1), expected, atol=1e-6)
