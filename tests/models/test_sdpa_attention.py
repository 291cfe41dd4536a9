"""SDPAttention gives megatron-core's unfused DotProductAttention's numbers (forward and input grads)
for causal GQA, the vision tower's key-padding mask, an explicit block-diagonal mask, packed rows
as segments (against the unfused path with the block-diagonal mask) and a causal sliding window
(against the unfused path with the window's dense mask), at TP=1 and with the TP-local head counts
of TP=2."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_patch.models.idefics2.layer_specs import _layer_spec, vision_block_spec
from megatron_patch.models.idefics2.sdpa_attention import SDPAttention, row_segments
from megatron_patch.platform import init_distributed
from megatron_patch.testing.attention_masks import packed_causal_mask
from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.distributed


HEADS, GROUPS, DIM, BATCH, SEQ = 8, 2, 16, 2, 24


def _config(groups: int, tp: int, **extra) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=groups,
        kv_channels=DIM, tensor_model_parallel_size=tp, attention_dropout=0.0, masked_softmax_fusion=False,
        use_cpu_initialization=True, **extra,
    )


# Packed rows: segments of 5, 11, 8 and 10, 1, 13 tokens; and one that runs over the row end (the
# dense mask cuts it per row, and so must the segments).
_PACKED = {"packed": [0, 5, 16, 24, 34, 35, 48], "crossing": [0, 5, 30, 48]}


def _mask(kind: str) -> tuple[AttnMaskType, torch.Tensor | None]:
    """(layer mask type, megatron-core mask with True = masked) of each case."""
    if kind == "causal":
        return AttnMaskType.causal, None
    if kind == "padding":  # vision tower: [b, 1, 1, s], padded keys masked, every image keeps some
        real = torch.tensor([SEQ, 17])
        return AttnMaskType.padding, (torch.arange(SEQ)[None, :] >= real[:, None]).view(BATCH, 1, 1, SEQ)
    if kind == "dense_padding":  # the same as [b, 1, s, s]
        _, mask = _mask("padding")
        return AttnMaskType.padding, mask.expand(BATCH, 1, SEQ, SEQ).contiguous()
    if kind in _PACKED or kind.startswith("segments_"):
        cu = torch.tensor(_PACKED[kind.removeprefix("segments_")], dtype=torch.int32)
        return AttnMaskType.causal, packed_causal_mask(cu, BATCH, SEQ)
    raise KeyError(kind)


def _window_mask(window: int) -> torch.Tensor:
    """[1, 1, s, s], True = masked: a query sees itself and the window - 1 keys before it."""
    offset = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]
    return ((offset < 0) | (offset >= window)).view(1, 1, SEQ, SEQ)


def compare_case(tp: int, kind: str, groups: int, softmax_scale, training: bool, window=None):
    """Max abs differences (output, dq, dk, dv) between SDPAttention and DotProductAttention on this rank.

    With `window`, ours is built with the sliding window (`window_size`) and given no mask (packed rows:
    their segments), the reference gets the window and the case's mask as one dense mask.
    """
    init_distributed(tp, 1, seed=1234)
    config = _config(groups, tp)
    mask_type, mask = _mask(kind)
    args = dict(layer_number=1, attn_mask_type=mask_type, attention_type="self", softmax_scale=softmax_scale)
    ours, reference = SDPAttention(config=config, **args), DotProductAttention(config=config, **args)
    ours_mask = mask
    if window is not None:
        ours = SDPAttention(config=_config(groups, tp, window_size=(window - 1, 0)), **args)
        ours_mask = None
        mask = _window_mask(window) if mask is None else mask | _window_mask(window)
    ours.train(training), reference.train(training)
    heads, kv = HEADS // tp, groups // tp
    g = torch.Generator().manual_seed(11 + torch.distributed.get_rank())
    q = torch.randn(SEQ, BATCH, heads, DIM, generator=g)
    k = torch.randn(SEQ, BATCH, kv, DIM, generator=g)
    v = torch.randn(SEQ, BATCH, kv, DIM, generator=g)
    grad_out = torch.randn(SEQ, BATCH, heads * DIM, generator=g)
    # "segments_*": ours gets the packed rows as segments (no mask), the reference the dense mask.
    packed = None
    if kind.startswith("segments_"):
        packed = row_segments(torch.tensor(_PACKED[kind.removeprefix("segments_")], dtype=torch.int32), BATCH, SEQ)
    results = []
    for module in (ours, reference):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if module is ours and packed is not None:
            out = module(*inputs, None, packed_seq_params=packed)
        else:
            out = module(*inputs, ours_mask if module is ours else mask)
        assert out.shape == (SEQ, BATCH, heads * DIM)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in inputs])
    return [float((a - b).abs().max()) for a, b in zip(*results)]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(
    "kind,groups,softmax_scale,training",
    [
        ("causal", GROUPS, None, False),  # GQA: 8 query heads over 2 kv heads (4 over 1 per TP rank)
        ("causal", HEADS, 0.3, True),  # plain MHA, explicit scale, training mode (dropout 0)
        ("padding", HEADS, None, False),
        ("dense_padding", GROUPS, None, False),
        ("packed", GROUPS, None, True),
        ("segments_packed", GROUPS, None, False),
        ("segments_crossing", GROUPS, 0.3, True),
        ("segments_crossing", HEADS, None, False),
    ],
)
def test_matches_unfused_dot_product_attention(tp, kind, groups, softmax_scale, training):
    for rank_diffs in run_distributed(tp, compare_case, tp, kind, groups, softmax_scale, training):
        assert max(rank_diffs) < 1e-5, (kind, rank_diffs)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(
    "kind,window,training",
    [
        ("causal", 5, True),  # 24 tokens: blocks of 5, the last one short
        ("causal", 8, False),  # three whole blocks
        ("causal", 1, False),  # each token sees only itself
        ("causal", 24, False),  # the window covers the sequence: plain causal
        ("segments_packed", 4, True),  # inside segments of 5, 11, 8 / 10, 1, 13 tokens
        ("segments_crossing", 7, False),
    ],
)
def test_sliding_window_matches_the_unfused_path_with_its_mask(tp, kind, window, training):
    for rank_diffs in run_distributed(tp, compare_case, tp, kind, GROUPS, None, training, window):
        assert max(rank_diffs) < 1e-5, (kind, window, rank_diffs)


def test_sliding_window_changes_the_output():
    # The cases above cannot pass by accident: a window shorter than the sequence changes the numbers.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(SEQ, 1, n, DIM, generator=g) for n in (HEADS, GROUPS, GROUPS))
    outputs = [
        SDPAttention(_config(GROUPS, 1, **extra), 1, AttnMaskType.causal, "self", pg_collection=_FakeCollection())(
            q, k, v, None
        )
        for extra in ({}, {"window_size": (4, 0)})
    ]
    assert float((outputs[0] - outputs[1]).abs().max()) > 0.1


def test_local_specs_use_sdpa():
    # The LLM spec is the shared local layer spec (language_block_spec needs the PP state for its
    # layer count); the vision spec is that layer with a padding mask.
    for spec in (_layer_spec(use_te=False), vision_block_spec(_config(GROUPS, 1), use_te=False).layer_specs[0]):
        assert spec.submodules.self_attention.submodules.core_attention is SDPAttention


def test_refuses_what_it_cannot_compute():
    for window in ((4, 2), (-1, 3)):
        with pytest.raises(ValueError, match=r"window_size .* only causal sliding windows"):
            SDPAttention(_config(GROUPS, 1, window_size=window), 1, AttnMaskType.causal, "self",
                         pg_collection=_FakeCollection())
    with pytest.raises(ValueError, match="window_attn_skip_freq"):
        SDPAttention(_config(GROUPS, 1, window_size=(4, 0), window_attn_skip_freq=2), 1, AttnMaskType.causal,
                     "self", pg_collection=_FakeCollection())
    with pytest.raises(ValueError, match="needs causal attention"):
        SDPAttention(_config(GROUPS, 1, window_size=(4, 0)), 1, AttnMaskType.padding, "self",
                     pg_collection=_FakeCollection())
    windowed = SDPAttention(_config(GROUPS, 1, window_size=(4, 0)), 1, AttnMaskType.causal, "self",
                            pg_collection=_FakeCollection())
    ours = SDPAttention(_config(GROUPS, 1), 1, AttnMaskType.causal, "self", pg_collection=_FakeCollection())
    q = torch.randn(4, 1, HEADS, DIM)
    kv = torch.randn(4, 1, GROUPS, DIM)
    with pytest.raises(ValueError, match="boolean"):
        ours(q, kv, kv, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="query heads"):
        ours(q[:, :, :4], kv, kv, None)
    with pytest.raises(ValueError, match="qkv_format 'thd'"):
        ours(q, kv, kv, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="explicit attention mask"):
        windowed(q, kv, kv, torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pad tokens included"):
        row_segments(torch.tensor([0, 3, 7], dtype=torch.int32), 2, 4)


def test_row_segments_split_at_row_ends():
    params = row_segments(torch.tensor([0, 5, 30, 48], dtype=torch.int32), BATCH, SEQ)
    assert params.qkv_format == "sbhd" and params.max_seqlen_q == params.max_seqlen_kv == SEQ
    assert params.cu_seqlens_q.tolist() == [0, 5, 24, 30, 48]


class _FakeGroup:
    def size(self) -> int:
        return 1


class _FakeCollection:
    tp = _FakeGroup()


def _work(params) -> int:
    """Query-key pairs SDPA computes for a plan (each group: segments x its longest squared)."""
    return sum(index.shape[0] * index.shape[1] ** 2 for index, _ in params.groups)


def test_packed_segments_are_grouped_so_work_follows_squared_lengths():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        lengths = (torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g) ** 4 * 600 + 1).long()
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
        total = int(cu[-1])
        params = row_segments(cu, 1, total)
        assert _work(params) <= sum(n * n for n in lengths.tolist()) / 0.49
        tokens = torch.cat([index[keep] for index, keep in params.groups])
        assert torch.equal(tokens.sort().values, torch.arange(total))  # every token in exactly one group
        assert torch.equal(tokens[params.restore], torch.arange(total))
    # One 3,072-token sample packed with 32 of 32 tokens: no longer 33 x 3,072^2.
    skewed = torch.tensor([0, 3072] + [3072 + 32 * (i + 1) for i in range(32)], dtype=torch.int32)
    assert _work(row_segments(skewed, 1, 4096)) == 3072**2 + 32 * 32**2
    assert _work(row_segments(skewed, 1, 4096, by_length=False)) == 33 * 3072**2


def test_grouped_segments_equal_one_padded_group():
    """Outputs and input gradients of the length-grouped plan equal those of every segment padded to
    the longest in one SDPA call (the plan before grouping), windowed too."""
    lengths = [97, 3, 5, 40, 1, 17, 30, 63]  # two rows of 128, a segment crossing the row end
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    for window in (None, 8):
        config = _config(GROUPS, 1, **({} if window is None else {"window_size": (window - 1, 0)}))
        module = SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self", pg_collection=_FakeCollection())
        gen = torch.Generator().manual_seed(3)
        q = torch.randn(128, 2, HEADS, DIM, generator=gen)
        k, v = torch.randn(128, 2, GROUPS, DIM, generator=gen), torch.randn(128, 2, GROUPS, DIM, generator=gen)
        results = []
        for by_length in (True, False):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = module(*inputs, None, packed_seq_params=row_segments(cu, 2, 128, by_length=by_length))
            out.square().sum().backward()
            results.append([out.detach()] + [t.grad for t in inputs])
        for ours, padded in zip(*results):
            torch.testing.assert_close(ours, padded, rtol=1e-4, atol=2e-5)


def test_masked_gqa_calls_repeat_kv_for_the_fused_kernels(monkeypatch):
    """A masked SDPA call (the window's band) gets K/V repeated per query head: with `enable_gqa` and a
    mask, CUDA has no fused kernel and falls to the math one (fp32 scores kept for backward)."""
    import megatron_patch.models.idefics2.sdpa_attention as sdpa

    calls, original = [], sdpa.F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask is not None, q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", record)
    module = SDPAttention(_config(GROUPS, 1, window_size=(4, 0)), 1, AttnMaskType.causal, "self",
                          pg_collection=_FakeCollection())
    q, kv = torch.randn(24, 1, HEADS, DIM), torch.randn(24, 1, GROUPS, DIM)
    module(q, kv, kv, None)
    masked = [c for c in calls if c[0]]
    assert masked and all(heads == kv_heads and not gqa for _, heads, kv_heads, gqa in masked)
    assert any(gqa for masked_, _, _, gqa in calls if not masked_)  # the unmasked first block keeps enable_gqa
