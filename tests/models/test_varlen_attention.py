"""Packed variable-length attention equals attention run on each sequence alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.models.idefics2.varlen_attention import varlen_attention

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("q_lens", [[3, 3, 3], [5, 1, 3]])
def test_packed_attention_equals_per_sequence_attention(q_lens):
    g = torch.Generator().manual_seed(0)
    k_lens = [7, 4, 12]
    heads, groups, dim = 4, 2, 8
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(k_lens), groups, dim, generator=g)
    v = torch.randn(sum(k_lens), groups, dim, generator=g)
    cu_q = F.pad(torch.tensor(q_lens).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(torch.tensor(k_lens).cumsum(0), (1, 0)).to(torch.int32)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale=dim**-0.5)
    assert out.shape == q.shape

    for i in range(3):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki = k[cu_k[i] : cu_k[i + 1]].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        vi = v[cu_k[i] : cu_k[i + 1]].repeat_interleave(heads // groups, dim=1).transpose(0, 1)
        expected = F.softmax(qi @ ki.transpose(1, 2) * dim**-0.5, dim=-1) @ vi
        assert torch.allclose(out[cu_q[i] : cu_q[i + 1]].transpose(0, 1), expected, atol=1e-6)
