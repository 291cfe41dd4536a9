"""Bad layouts fail before any model is built, with one line that names what to change."""
from __future__ import annotations

import pytest

from megatron_patch.models.idefics2.config import (
    ParallelOptions,
    build_configs,
    check_sequence_length,
    layers_per_stage,
    tied_word_embeddings,
    validate_layout,
)
from megatron_patch.models.idefics2.tiny import tiny_idefics2_config


@pytest.mark.parametrize(
    "opts,world_size,expected",
    [
        (ParallelOptions(tensor_model_parallel_size=3), None, "--tensor-model-parallel-size 3 does not divide"),
        (ParallelOptions(tensor_model_parallel_size=4), None, "perceiver num_key_value_heads"),
        (ParallelOptions(pipeline_model_parallel_size=3), None, "do not split evenly over --pipeline-model-parallel-size 3"),
        (ParallelOptions(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=4), None, "--decoder-first-pipeline-num-layers 4 must be between 1 and 3"),
        (ParallelOptions(pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=1), None, "leaves 3 of 4 LLM layers"),
        (ParallelOptions(decoder_first_pipeline_num_layers=1), None, "needs --pipeline-model-parallel-size >= 2"),
        (ParallelOptions(tensor_model_parallel_size=2), 3, "world size 3 is not divisible"),
    ],
)
def test_bad_layouts_raise_one_clear_line(opts, world_size, expected):
    config = tiny_idefics2_config("mistral")  # 4 vision heads, 2 perceiver kv heads, 4 LLM layers
    with pytest.raises(ValueError) as info:
        validate_layout(config, opts, world_size)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_good_layouts_pass_and_pad_the_vocabulary():
    config = tiny_idefics2_config("mistral")  # vocabulary 101
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]:
        validate_layout(config, ParallelOptions(tp, pp), world_size=tp * pp * 2)
    configs = build_configs(config, ParallelOptions(tensor_model_parallel_size=2))
    assert (configs.vocab_size, configs.padded_vocab_size) == (101, 102)
    assert configs.language.num_query_groups == 2 and configs.language.kv_channels == 12
    assert configs.perceiver.num_query_groups == 2 and configs.perceiver.kv_channels == 8


def test_uneven_first_stage():
    assert layers_per_stage(10, 4, first_stage_layers=1) == [1, 3, 3, 3]
    assert layers_per_stage(8, 2) == [4, 4]


def test_unsupported_rope_scaling_is_refused():
    config = tiny_idefics2_config("llama")
    config.text_config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        build_configs(config, ParallelOptions())


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_sliding_window_shorter_than_the_sequence_is_refused(text):
    config = tiny_idefics2_config(text)
    check_sequence_length(config, 1 << 20)  # no window (Mistral's null, or Llama's none at all)
    config.text_config.sliding_window = 16
    check_sequence_length(config, 16)  # the window covers the whole sequence: same attention
    message = _one_line_error(check_sequence_length, config, 17, match="--seq-length 17")
    assert "text_config.sliding_window (16)" in message


@pytest.mark.parametrize("tied", [False, True])
def test_one_function_decides_the_tied_head_for_model_and_mapping(tied):
    from megatron_patch.models.idefics2.weight_mapping import HF_EMBED_TOKENS, HF_LM_HEAD, tensor_mappings

    config = tiny_idefics2_config("llama", tie_word_embeddings=tied)
    assert tied_word_embeddings(config) is tied
    assert build_configs(config, ParallelOptions()).tie_word_embeddings is tied
    head = next(m for m in tensor_mappings(config) if m.mcore == "language_model.output_layer.weight")
    assert head.hf == ((HF_EMBED_TOKENS,) if tied else (HF_LM_HEAD,))


@pytest.mark.parametrize("top,text", [(False, True), (True, False)])
def test_tied_flags_that_disagree_are_refused(top, text):
    from megatron_patch.models.idefics2.weight_mapping import tensor_mappings

    config = tiny_idefics2_config("mistral", tie_word_embeddings=top)
    config.text_config.tie_word_embeddings = text
    match = f"tie_word_embeddings={top} but text_config.tie_word_embeddings={text}"
    for fn, args in ((tied_word_embeddings, (config,)), (validate_layout, (config, ParallelOptions())),
                     (build_configs, (config, ParallelOptions())), (tensor_mappings, (config,))):
        _one_line_error(fn, *args, match=match)


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_text_linear_biases_are_refused_by_the_config_builder(flag):
    config = tiny_idefics2_config("llama")
    setattr(config.text_config, flag, True)
    _one_line_error(validate_layout, config, ParallelOptions(), match=f"text_config.{flag} is true")
    _one_line_error(build_configs, config, ParallelOptions(), match=f"text_config.{flag} is true")
