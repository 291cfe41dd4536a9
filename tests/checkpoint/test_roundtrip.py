"""HF -> Megatron(TP, PP) -> HF is bit-exact for every tensor, both text backbones, tied or not."""
from __future__ import annotations

import pytest
import torch

from megatron_patch.checkpoint import RELEASE, CheckpointInfo, read_tracker, resolve_iteration
from megatron_patch.checkpoint.model_files import RankReader
from tests.checkpoint.fixtures import assert_bit_exact, idefics2_config, round_trip, save_idefics2

pytestmark = pytest.mark.unit


VARIANTS = {
    "mistral": dict(text="mistral"),
    "llama": dict(text="llama"),
    "mistral-kv4": dict(text="mistral", kv_heads=4),  # TP=4 must divide the query groups
    "llama-tied": dict(text="llama", tied=True),
    "mistral-tied": dict(text="mistral", tied=True),
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Variant -> (folder, config); built lazily, once per module."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(variant):
        if variant not in cache:
            config = idefics2_config(**VARIANTS[variant])
            folder = root / variant
            # one variant is saved sharded, so the index reader is exercised too
            save_idefics2(folder, config, seed=len(cache), max_shard_size="100KB" if variant == "llama" else None)
            assert (folder / "model.safetensors.index.json").is_file() == (variant == "llama")
            cache[variant] = (folder, config)
        return cache[variant]

    return get


CASES = [
    ("mistral", 1, 1, None), ("mistral", 2, 1, None), ("mistral", 1, 2, None), ("mistral", 2, 2, None),
    ("mistral-kv4", 4, 1, None),
    ("llama", 1, 1, None), ("llama", 2, 1, None), ("llama", 1, 2, None), ("llama", 2, 2, None), ("llama", 4, 1, None),
    ("llama-tied", 1, 1, None), ("llama-tied", 2, 2, None), ("mistral-tied", 1, 2, None),
    ("llama", 2, 2, 1), ("mistral", 1, 3, 2),  # uneven first stage
]


@pytest.mark.parametrize("variant,tp,pp,first", CASES)
def test_round_trip_is_bit_exact(hf_checkpoints, tmp_path, variant, tp, pp, first):
    src, config = hf_checkpoints(variant)
    mg, back = round_trip(src, tmp_path, tp, pp, first)
    assert_bit_exact(src, back, config)
    assert read_tracker(mg) == RELEASE
    info = CheckpointInfo.read(mg / RELEASE)
    assert (info.tensor_model_parallel_size, info.pipeline_model_parallel_size) == (tp, pp)
    assert info.decoder_first_pipeline_num_layers == first
    ranks = sorted(p.name for p in (mg / RELEASE).iterdir() if p.name.startswith("mp_rank_"))
    assert len(ranks) == tp * pp and ranks[0] == ("mp_rank_00" if pp == 1 else "mp_rank_00_000")
    assert sorted(p.name for p in mg.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]


def test_megatron_files_use_canonical_names_and_stream(hf_checkpoints, tmp_path):
    """A tiny memory budget forces many files per rank; the content is unchanged."""
    src, config = hf_checkpoints("mistral")
    mg, back = round_trip(src, tmp_path, 2, 2, extra=["--memory-budget", "40KB"])
    assert_bit_exact(src, back, config)
    last = RankReader(mg / RELEASE / "mp_rank_01_001")
    assert len(set(last.weight_map.values())) > 2
    assert "language_model.decoder.layers.1.self_attention.linear_qkv.weight" in last  # local numbering
    assert "language_model.output_layer.weight" in last
    first = RankReader(mg / RELEASE / "mp_rank_00_000")
    assert "vision_model.decoder.layers.0.self_attention.linear_qkv.weight" in first
    assert (mg / RELEASE / "hf_config" / "config.json").is_file()


def test_bf16_round_trip_and_from_pretrained(tmp_path):
    from transformers import Idefics2ForConditionalGeneration

    config = idefics2_config("llama")
    model = save_idefics2(tmp_path / "fp32", config, seed=9)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    _, back = round_trip(tmp_path / "bf16", tmp_path, 2, 2)
    assert_bit_exact(tmp_path / "bf16", back, config)
    loaded = Idefics2ForConditionalGeneration.from_pretrained(str(back), dtype=torch.bfloat16).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_processor_and_tokenizer_travel_with_the_checkpoint(tmp_path):
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    config = idefics2_config("mistral", tied=True)
    model = save_idefics2(tmp_path / "hf", config, seed=4, processor=True)
    mg, back = round_trip(tmp_path / "hf", tmp_path, 1, 2)
    _, folder = resolve_iteration(mg)
    assert (folder / "hf_config" / "tokenizer.json").is_file()
    processor = AutoProcessor.from_pretrained(str(back))
    original = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    text = "a cat <image> on the mat"
    assert processor.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    assert processor.image_seq_len == config.perceiver_config.resampler_n_latents
    loaded = Idefics2ForConditionalGeneration.from_pretrained(str(back)).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_reconverting_the_same_model_is_a_no_op(hf_checkpoints, tmp_path, capsys):
    src, _ = hf_checkpoints("mistral")
    round_trip(src, tmp_path, 2, 1)
    capsys.readouterr()
    round_trip(src, tmp_path, 2, 1)
    out = capsys.readouterr().out
    assert "[identical]" in out and "[identical, iteration release]" in out


@pytest.mark.parametrize("tied", [False, True])
def test_hf_name_constants_are_the_mappings_names(tied):
    """The converters' own HF names (weight_mapping constants) are the ones the mapping reads."""
    from megatron_patch.models.idefics2.weight_mapping import (
        HF_CONNECTOR_PREFIX, HF_EMBED_TOKENS, HF_LM_HEAD, HF_TEXT_PREFIX, HF_VISION_PREFIX, hf_tensor_names,
    )

    names = hf_tensor_names(idefics2_config("llama", tied=tied))
    assert HF_EMBED_TOKENS in names and (HF_LM_HEAD in names) != tied
    prefixes = (HF_TEXT_PREFIX, HF_VISION_PREFIX, HF_CONNECTOR_PREFIX)
    assert all(any(n.startswith(p) for p in prefixes) for n in names if n != HF_LM_HEAD)
    assert all(any(n.startswith(p) for n in names) for p in prefixes)


def test_llama3_rope_scaling_survives_the_round_trip(tmp_path):
    """Llama-3.1 RoPE (`rope_parameters`, rope_type llama3) is kept in the Megatron checkpoint's
    hf_config and in the HF config written back, so both sides rotate the same way."""
    from megatron_patch.checkpoint import read_checkpoint_config
    from megatron_patch.checkpoint.config_files import read_idefics2_config
    from megatron_patch.models.idefics2.config import RopeSettings, rope_settings

    config = idefics2_config("llama")
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192, rope_theta=500000.0)
    config.text_config.rope_parameters = rope
    config.text_config.max_position_embeddings = 131072
    save_idefics2(tmp_path / "hf", config, seed=3)
    mg, back = round_trip(tmp_path / "hf", tmp_path, 2, 1)
    assert_bit_exact(tmp_path / "hf", back, config)
    for text_config in (read_checkpoint_config(mg).text_config, read_idefics2_config(back).text_config):
        assert text_config.rope_parameters == rope
        assert rope_settings(text_config) == RopeSettings(500000.0, True, 8.0)
