"""The Megatron Idefics2 matches transformers' Idefics2 at every TP x PP layout, forward and backward."""
from __future__ import annotations

import pytest
import torch

from megatron_patch.platform import accelerators
from tests.models import idefics2_cases as cases
from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.distributed


ATOL = 1e-4  # fp32


def _check(diffs):
    # A parity check on near-constant logits would prove nothing: the reference must vary.
    assert diffs["logit_std"] > 0.1, diffs
    for component in ("vision", "connector", "logits"):
        assert diffs[component] < ATOL, (component, diffs)


@pytest.mark.parametrize("text", ["mistral", "llama"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_forward_parity(text, tp, pp):
    # Llama-style runs with a tied head: it lives on both the first and last stage when PP > 1.
    num_images = 3 if text == "llama" else 2
    results = run_distributed(tp * pp, cases.parity_case, text, tp, pp, num_images, tied=(text == "llama"))
    _check(results[0])


@pytest.mark.skipif(not accelerators()["transformer_engine"] or not torch.cuda.is_available(),
                    reason="--transformer-impl transformer_engine needs transformer-engine and CUDA; the local layers are tested above")
@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_forward_parity_with_transformer_engine_layers(text):
    results = run_distributed(1, cases.parity_case, text, 1, 1, 2, tied=(text == "llama"), use_te=True)
    _check(results[0])


def test_forward_parity_uneven_first_stage():
    # 4 LLM layers over 2 stages with only 1 on stage 0 (which also holds vision + connector).
    results = run_distributed(2, cases.parity_case, "mistral", 1, 2, 2, first_stage_layers=1)
    _check(results[0])


@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_loss_and_grads_match_transformers_and_layout(text):
    tied = text == "llama"
    hf_loss, hf_grads = cases.hf_loss_and_grads(text, tied)
    single_loss, single_grads = run_distributed(1, cases.loss_and_grads_case, text, 1, 1, tied)[0]
    split_loss, split_grads = run_distributed(4, cases.loss_and_grads_case, text, 2, 2, tied)[0]

    assert set(single_grads) == set(hf_grads) == set(split_grads)
    assert abs(single_loss - hf_loss) < 1e-5
    assert abs(split_loss - single_loss) < 1e-5
    for name, ref in hf_grads.items():
        scale = float(ref.abs().max()) + 1e-12
        assert torch.allclose(single_grads[name], ref, atol=1e-5 * max(scale, 1.0), rtol=1e-4), name
        # Layout invariance: TP=2 x PP=2 gives the same gradient as TP=1 x PP=1.
        assert torch.allclose(split_grads[name], single_grads[name], atol=1e-6 * max(scale, 1.0), rtol=1e-5), name
    # Every tensor actually learns from this batch (a silently disconnected part would be zero).
    assert all(float(g.abs().max()) > 0 for g in hf_grads.values())


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_sequence_parallel_matches_transformers(tp, pp):
    # Through megatron-core's DDP and grad finalisation, which sums the sequence-parallel norm grads over TP.
    hf_loss, hf_grads = cases.hf_loss_and_grads("llama", tied=True)
    loss, grads = run_distributed(tp * pp, cases.loss_and_grads_case, "llama", tp, pp, True, ddp=True,
                                  sequence_parallel=True)[0]
    assert abs(loss - hf_loss) < 1e-5
    assert set(grads) == set(hf_grads)
    for name, ref in hf_grads.items():
        scale = float(ref.abs().max()) + 1e-12
        assert torch.allclose(grads[name], ref, atol=1e-5 * max(scale, 1.0), rtol=1e-4), name


def test_activation_recompute_changes_nothing():
    base_loss, base_grads = run_distributed(2, cases.loss_and_grads_case, "mistral", 2, 1)[0]
    loss, grads = run_distributed(
        2, cases.loss_and_grads_case, "mistral", 2, 1,
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
    )[0]
    assert loss == pytest.approx(base_loss, abs=1e-6)
    for name, ref in base_grads.items():
        assert torch.allclose(grads[name], ref, atol=1e-7, rtol=1e-5), name


def test_image_tokens_not_matching_features_name_the_sample():
    message = run_distributed(1, cases.image_token_mismatch_case)[0]
    assert message is not None and "sample 1" in message and "--seq-length" in message


@pytest.mark.parametrize("tp,pp,window", [(1, 1, None), (2, 2, None), (2, 2, 5)])
def test_packed_rows_equal_one_sample_per_row(tp, pp, window):
    # Attention must not cross samples: sample 1 shares a row with sample 0 and must not see it.
    # With a sliding window, it applies inside each sample as it does to a sample alone.
    alone, packed = run_distributed(tp * pp, cases.packed_vs_unpacked_case, tp, pp, window)[0]
    assert alone.shape == packed.shape and float(alone.std()) > 0.1
    assert float((alone - packed).abs().max()) < ATOL


WINDOW, WINDOW_TEXT_TOKENS = 5, 30  # samples of 42 tokens: the window runs in 9 blocks


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_sliding_window_below_the_sequence_matches_transformers(tp, pp):
    results = run_distributed(tp * pp, cases.parity_case, "mistral", tp, pp, 2, sliding_window=WINDOW,
                              text_tokens=WINDOW_TEXT_TOKENS)
    _check(results[0])


def test_sliding_window_changes_the_logits():
    # The parity above cannot pass by accident: transformers' logits with the window are far from without.
    assert cases.hf_sliding_window_effect(WINDOW, WINDOW_TEXT_TOKENS) > 100 * ATOL


def test_sliding_window_loss_and_grads_match_transformers():
    hf_loss, hf_grads = cases.hf_loss_and_grads("mistral", sliding_window=WINDOW)
    loss, grads = run_distributed(4, cases.loss_and_grads_case, "mistral", 2, 2, sliding_window=WINDOW)[0]
    assert abs(loss - hf_loss) < 1e-5 and set(grads) == set(hf_grads)
    for name, ref in hf_grads.items():
        scale = float(ref.abs().max()) + 1e-12
        assert torch.allclose(grads[name], ref, atol=1e-5 * max(scale, 1.0), rtol=1e-4), name


@pytest.mark.parametrize("tower,changed", [("vision_config", "vision"), ("perceiver_config", "connector"),
                                           ("text_config", "logits")])
def test_attention_dropout_of_each_tower_applies_in_training_only(tower, changed):
    # HF's attention_dropout of one tower: two training forwards differ from that tower on (and not
    # upstream of it); in eval mode the model equals a dropout-free one.
    diffs = run_distributed(2, cases.attention_dropout_case, tower, 2)[0]
    order = ["vision", "connector", "logits"]
    for component in order:
        moved = diffs["train_vs_train"][component]
        assert (moved > 1e-3) if order.index(component) >= order.index(changed) else (moved == 0.0), (component, diffs)
        assert diffs["eval_vs_no_dropout"][component] == 0.0, (component, diffs)


LLAMA3_TEXT_TOKENS = 200  # positions up to ~220: far enough for the scaled low frequencies to turn


@pytest.mark.parametrize("factor", [8, 32])  # Llama-3.1, Llama-3.2
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_llama3_rope_scaling_matches_transformers(factor, tp, pp):
    rope = cases.llama3_rope(factor)
    results = run_distributed(tp * pp, cases.parity_case, "llama", tp, pp, 3, tied=True, rope=rope,
                              text_tokens=LLAMA3_TEXT_TOKENS)
    _check(results[0])


def test_llama3_rope_scaling_changes_the_logits():
    # The parity above cannot pass by accident: unscaled RoPE, or the other factor, is far off.
    unscaled = {"rope_type": "default", "rope_theta": cases.llama3_rope(8)["rope_theta"]}
    vs_unscaled = run_distributed(1, cases.parity_case, "llama", 1, 1, 3, tied=True, rope=cases.llama3_rope(8),
                                  megatron_rope=unscaled, text_tokens=LLAMA3_TEXT_TOKENS)[0]
    vs_factor_8 = run_distributed(1, cases.parity_case, "llama", 1, 1, 3, tied=True, rope=cases.llama3_rope(32),
                                  megatron_rope=cases.llama3_rope(8), text_tokens=LLAMA3_TEXT_TOKENS)[0]
    assert vs_unscaled["logits"] > 100 * ATOL, vs_unscaled
    assert vs_factor_8["logits"] > 10 * ATOL, vs_factor_8


def test_weights_loaded_into_an_uninitialised_model_are_all_there():
    # Built without random init and set to NaN, then loaded: equal to an initialised model loaded the
    # same way, on every stage and TP rank (vision position table, perceiver latents, norms included).
    for part in run_distributed(4, cases.init_off_then_load_case, 2, 2):
        assert part["perform_initialization"] == [False, False]
        assert part["same_keys"] and part["tensors"] > 10, part
        assert part["differ"] == [] and part["nan"] == [] and part["tp_attributes_differ"] == [], part


def test_bias_fusions_keep_loss_and_grads():
    # megatron-core's fused SwiGLU / tanh-GELU / bias-dropout-add against the unfused torch path.
    base_loss, base_grads = run_distributed(1, cases.loss_and_grads_case, "llama", 1, 1, True)[0]
    loss, grads = run_distributed(1, cases.fused_loss_and_grads_case, "llama", 1, 1, True)[0]
    assert loss == pytest.approx(base_loss, abs=1e-6)
    assert set(grads) == set(base_grads)
    for name, ref in base_grads.items():
        scale = float(ref.abs().max()) + 1e-12
        assert torch.allclose(grads[name], ref, atol=1e-6 * max(scale, 1.0), rtol=1e-5), name
