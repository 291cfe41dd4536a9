"""Bad layouts fail before any model is built, with one line that names what to change."""
from __future__ import annotations

import pytest

import torch
import torch.nn.functional as F

from megatron_patch.models.idefics2.config import (
    ParallelOptions,
    RopeSettings,
    build_configs,
    layers_per_stage,
    rope_settings,
    sliding_window,
    tied_word_embeddings,
    validate_layout,
)
from megatron_patch.testing.tiny import tiny_idefics2_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "opts,world_size,expected",
    [
        (ParallelOptions(tensor_model_parallel_size=3), None, "--tensor-model-parallel-size 3 does not divide"),
        # the perceiver's 2 KV heads would be replicated at TP 4; the text model's 2 cannot be
        (ParallelOptions(tensor_model_parallel_size=4), None, "does not divide the text num_key_value_heads (2)"),
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


def _llama3(**changes) -> dict:
    params = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192, rope_theta=500000.0)
    return {**params, **changes}


def test_rope_settings_of_default_and_llama3_rope():
    assert rope_settings(tiny_idefics2_config("mistral").text_config) == RopeSettings(10000.0)
    config = tiny_idefics2_config("llama")
    assert build_configs(config, ParallelOptions()).rope == RopeSettings(500000.0)
    for factor in (8.0, 32.0):  # Llama-3.1, Llama-3.2
        config.text_config.rope_parameters = _llama3(factor=factor)
        assert build_configs(config, ParallelOptions()).rope == RopeSettings(500000.0, True, factor)


def test_llama3_rope_of_a_transformers4_config_file(tmp_path):
    # Llama-3.1's config.json says `rope_scaling` with `rope_theta` beside it; transformers 5 reads it.
    import json

    from transformers import AutoConfig, LlamaConfig

    LlamaConfig(max_position_embeddings=131072).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("rope_parameters", None)
    data["rope_theta"] = 500000.0
    data["rope_scaling"] = {k: v for k, v in _llama3().items() if k != "rope_theta"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert rope_settings(AutoConfig.from_pretrained(str(tmp_path))) == RopeSettings(500000.0, True, 8.0)


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type 'yarn' is not supported"),
        (_llama3(low_freq_factor=2.0), "low_freq_factor 2.0 is not supported"),
        (_llama3(high_freq_factor=8.0), "high_freq_factor 8.0 is not supported"),
        (_llama3(original_max_position_embeddings=4096), "original_max_position_embeddings 4096 is not supported"),
        ({k: v for k, v in _llama3().items() if k != "factor"}, "factor None must be a positive number"),
    ],
)
def test_unsupported_rope_is_refused_naming_the_field(params, expected):
    config = tiny_idefics2_config("llama")
    config.text_config.rope_parameters = params
    for fn in (validate_layout, build_configs):
        message = _one_line_error(fn, config, ParallelOptions(), match=expected)
        assert message.startswith("text_config")


def test_init_and_device_choice_reach_every_config():
    config = tiny_idefics2_config("llama")
    cuda = torch.cuda.is_available()
    for init in (True, False):
        configs = build_configs(config, ParallelOptions(), init_weights=init)
        for c in (configs.vision, configs.projection, configs.perceiver, configs.language):
            assert c.perform_initialization is init
            assert c.use_cpu_initialization is not cuda  # on the GPU where there is one
    assert build_configs(config, ParallelOptions(use_cpu_initialization=True)).language.use_cpu_initialization
    if not cuda:
        _one_line_error(build_configs, config, ParallelOptions(use_cpu_initialization=False),
                        match="use_cpu_initialization=False needs CUDA")


def test_bias_fusions_only_where_they_compute_the_same_function():
    config = tiny_idefics2_config("llama")  # SigLIP: gelu_pytorch_tanh; Llama and perceiver: SwiGLU
    off = build_configs(config, ParallelOptions(bias_fusions=False))
    on = build_configs(config, ParallelOptions(bias_fusions=True))
    for c in (off.vision, off.projection, off.perceiver, off.language):
        assert not c.bias_activation_fusion and not c.bias_dropout_fusion
    for c in (on.projection, on.perceiver, on.language):
        assert c.bias_activation_fusion and c.bias_dropout_fusion and c.activation_func is F.silu
    # megatron-core's fused GELU is the tanh approximation, so the tanh-GELU tower is handed over as F.gelu.
    assert on.vision.bias_activation_fusion and on.vision.activation_func is F.gelu
    assert not on.vision.masked_softmax_fusion and not on.language.apply_rope_fusion
    config.vision_config.hidden_act = "gelu"  # exact GELU: fusing would switch it to the approximation
    exact = build_configs(config, ParallelOptions(bias_fusions=True)).vision
    assert not exact.bias_activation_fusion and exact.activation_func is F.gelu and exact.bias_dropout_fusion
    default = build_configs(config, ParallelOptions()).language
    assert default.bias_activation_fusion is torch.cuda.is_available()


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_no_sliding_window_means_full_causal_attention(text):
    config = tiny_idefics2_config(text)
    assert sliding_window(config.text_config) is None  # Mistral's null, or Llama's none at all
    assert build_configs(config, ParallelOptions()).language.window_size is None


def test_a_sliding_window_in_a_llama_config_is_refused():
    # transformers' Llama ignores the field: neither attending with it nor without it would be a safe guess.
    config = tiny_idefics2_config("llama")
    config.text_config.sliding_window = 16
    _one_line_error(validate_layout, config, ParallelOptions(), match="'llama' text config")


def test_attention_dropout_and_init_std_come_from_each_sub_config():
    config = tiny_idefics2_config("mistral")
    config.vision_config.attention_dropout, config.vision_config.initializer_range = 0.1, 0.01
    config.perceiver_config.attention_dropout, config.perceiver_config.initializer_range = 0.2, 0.03
    config.text_config.attention_dropout, config.text_config.initializer_range = 0.3, 0.04
    configs = build_configs(config, ParallelOptions())
    got = {name: (c.attention_dropout, c.init_method_std, c.hidden_dropout)
           for name, c in (("vision", configs.vision), ("perceiver", configs.perceiver), ("language", configs.language))}
    assert got == {"vision": (0.1, 0.01, 0.0), "perceiver": (0.2, 0.03, 0.0), "language": (0.3, 0.04, 0.0)}
    config.text_config.attention_dropout = 1.0
    _one_line_error(validate_layout, config, ParallelOptions(), match=r"text_config.attention_dropout 1.0 must be in \[0, 1\)")
    config.text_config.attention_dropout = 0.0
    config.vision_config.initializer_range = 0.0
    _one_line_error(validate_layout, config, ParallelOptions(), match="vision_config.initializer_range 0.0 must be positive")


def test_vision_channels_other_than_rgb_are_refused():
    config = tiny_idefics2_config("mistral")
    config.vision_config.num_channels = 1
    _one_line_error(validate_layout, config, ParallelOptions(), match="vision_config.num_channels 1")


def test_sliding_window_reaches_the_language_config_only():
    config = tiny_idefics2_config("mistral")
    config.text_config.sliding_window = 16
    configs = build_configs(config, ParallelOptions())
    assert configs.language.window_size == (15, 0)  # itself and the 15 tokens before it
    assert configs.vision.window_size is configs.perceiver.window_size is configs.projection.window_size is None
    for bad in (0, -3):  # transformers' Mistral config itself refuses non-integers
        config.text_config.sliding_window = bad
        _one_line_error(validate_layout, config, ParallelOptions(), match="text_config.sliding_window")


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
