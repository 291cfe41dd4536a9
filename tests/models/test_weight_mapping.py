"""The one weight mapping: every split rule inverts exactly, and pipeline placement is right."""
from __future__ import annotations

import pytest
import torch

from megatron_patch.models.idefics2.weight_mapping import (
    QKV,
    PipelineLayout,
    hf_tensor_names,
    hf_to_mcore,
    mcore_to_hf,
    tensor_mappings,
)
from megatron_patch.testing.tiny import tiny_idefics2_config

pytestmark = pytest.mark.unit


def _hf_shapes(config):
    from transformers import Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration(config)
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("text,tied", [("mistral", False), ("llama", True)])
def test_mapping_covers_every_hf_tensor(text, tied):
    config = tiny_idefics2_config(text, tie_word_embeddings=tied)
    shapes = _hf_shapes(config)
    names = set(hf_tensor_names(config))
    expected = set(shapes) - ({"lm_head.weight"} if tied else set())
    assert names == expected


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_then_merge_is_exact(tp):
    config = tiny_idefics2_config("llama")  # its head counts all divide 4
    shapes = _hf_shapes(config)
    g = torch.Generator().manual_seed(0)
    for m in tensor_mappings(config):
        hf = [torch.randn(shapes[name], generator=g) for name in m.hf]
        shards = [hf_to_mcore(m, hf, r, tp) for r in range(tp)]
        assert len({tuple(s.shape) for s in shards}) == 1, m.mcore
        for original, merged in zip(hf, mcore_to_hf(m, shards)):
            assert torch.equal(original, merged), m.mcore


def test_qkv_is_interleaved_per_query_group():
    # 4 heads, 2 groups, head dim 1: rank 0 must hold group 0 = [q0, q1, k0, v0].
    config = tiny_idefics2_config("mistral")
    m = next(x for x in tensor_mappings(config) if x.split == QKV and x.mcore.startswith("language_model"))
    m = type(m)(m.mcore, m.hf, m.split, heads=(4, 2, 1))
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    assert hf_to_mcore(m, [q, k, v], 0, 2).flatten().tolist() == [0, 1, 10, 20]
    assert hf_to_mcore(m, [q, k, v], 1, 2).flatten().tolist() == [2, 3, 11, 21]


def test_vocab_is_padded_to_tp_multiple_with_zero_rows():
    config = tiny_idefics2_config("mistral")  # vocabulary 101
    m = next(x for x in tensor_mappings(config) if x.mcore.endswith("word_embeddings.weight"))
    emb = torch.randn(101, 48)
    shards = [hf_to_mcore(m, [emb], r, 4) for r in range(4)]
    assert [s.shape[0] for s in shards] == [26] * 4
    assert torch.equal(shards[3][-3:], torch.zeros(3, 48))
    assert torch.equal(mcore_to_hf(m, shards)[0], emb)


def test_pipeline_placement_renumbers_layers_and_places_the_tied_head():
    config = tiny_idefics2_config("llama", tie_word_embeddings=True)
    layout = PipelineLayout(4, 3, first_stage_layers=2)
    by_name = {m.mcore: m for m in tensor_mappings(config)}
    layer3 = by_name["language_model.decoder.layers.3.mlp.linear_fc2.weight"]
    assert layout.placements(layer3, tied=True) == [(2, "language_model.decoder.layers.0.mlp.linear_fc2.weight")]
    head = by_name["language_model.output_layer.weight"]
    assert layout.placements(head, tied=True) == [(2, "language_model.output_layer.weight")]
    assert PipelineLayout(4, 1).placements(head, tied=True) == []
    assert layout.placements(by_name["vision_model.embeddings.patch_embedding.weight"], tied=True)[0][0] == 0
