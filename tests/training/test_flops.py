"""The FLOP count against hand-computed formulas and against torch's FlopCounterMode on HF Idefics2.

FlopCounterMode (torch.utils.flop_counter) counts matmuls, convolutions and attention kernels of an
actual forward of transformers' Idefics2, code nobody here wrote. It skips norms, activations,
softmax and bias adds, as our count does, so the two agree to well under 1% (measured: exactly);
RTOL = 1% leaves room for such small terms only. Eager attention is used because torch does not
count CPU flash SDPA. One difference is by design: torch charges the full s x s causal score matrix,
Megatron-LM's formula the causal half, so the LLM comparison adds the other half back.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText

from megatron_patch.data.collate import collate
from megatron_patch.testing.tiny import tiny_idefics2_config
from megatron_patch.training import flops
from megatron_patch.training.flops import BatchShapes

pytestmark = pytest.mark.unit


RTOL = 0.01


@pytest.fixture(scope="module", params=["mistral", "llama"])
def hf(request):
    torch.manual_seed(0)
    config = tiny_idefics2_config(request.param)
    # Idefics2ForConditionalGeneration; eager attention, whose matmuls torch's counter sees.
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="eager").eval()
    return config, model


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_llm_term_is_megatron_formula_by_hand():
    t = tiny_idefics2_config().text_config  # h 48, f 96, 4 layers, 4 heads, 2 groups, head_dim 12, V 101
    rows, s = 3, 20
    q, k = 12 * 4, 12 * 2
    per_token = 4 * (3 * 48 * 96 + 48 * (q + 2 * k) + q * 48 + q * s) + 48 * 101
    assert flops.llm_forward_flops(t, BatchShapes(rows, s)) == 2 * rows * s * per_token
    expected_training = 6 * rows * s * per_token
    assert flops.training_flops(tiny_idefics2_config(), BatchShapes(rows, s)) == expected_training


def test_sliding_window_counts_only_the_windows_pairs():
    config = tiny_idefics2_config()
    t, rows, s, q, layers = config.text_config, 3, 20, 12 * 4, 4
    full = flops.llm_forward_flops(t, BatchShapes(rows, s))
    t.sliding_window = s  # covers the sequence: the same attention
    assert flops.llm_forward_flops(t, BatchShapes(rows, s)) == full
    t.sliding_window = 6  # Megatron's s^2 / 2 causal pairs become s W - W^2 / 2
    attention_saved = 2 * rows * layers * q * (s * s - (2 * s * 6 - 6 * 6))
    assert flops.llm_forward_flops(t, BatchShapes(rows, s)) == full - attention_saved


def test_llm_matches_flop_counter(hf):
    config, model = hf
    t = config.text_config
    rows, s = 2, 16
    ids = torch.randint(0, t.vocab_size - 3, (rows, s))
    measured = counted(lambda: model.lm_head(model.model.text_model(input_ids=ids).last_hidden_state))
    q = t.head_dim * t.num_attention_heads
    other_causal_half = 2 * rows * t.num_hidden_layers * q * s * s
    ours = flops.llm_forward_flops(t, BatchShapes(rows, s)) + other_causal_half
    assert ours == pytest.approx(measured, rel=RTOL)


@pytest.mark.parametrize("height,width", [(28, 28), (56, 42), (56, 56)])
def test_vision_and_connector_match_flop_counter(hf, height, width):
    config, model = hf
    p = config.vision_config.patch_size
    patch_mask = torch.ones(1, height // p, width // p, dtype=torch.bool)
    pixels = torch.randn(1, 3, height, width)
    shapes = BatchShapes.from_patches(rows=1, seq_length=8, image_patches=[patch_mask.sum().item()])

    hidden = []
    measured_vision = counted(lambda: hidden.append(model.model.vision_model(pixels, patch_mask).last_hidden_state))
    measured_connector = counted(lambda: model.model.connector(hidden[0], attention_mask=patch_mask.view(1, -1)))
    assert flops.vision_forward_flops(config.vision_config, shapes) == pytest.approx(measured_vision, rel=RTOL)
    assert flops.connector_forward_flops(config, shapes) == pytest.approx(measured_connector, rel=RTOL)


def test_vision_grows_linearly_plus_quadratic_attention():
    v = tiny_idefics2_config().vision_config
    one, two = (flops.vision_forward_flops(v, BatchShapes.from_patches(1, 8, [n])) for n in (10, 20))
    # Doubling P doubles the linear part and quadruples the attention part 4 P^2 h per layer.
    assert two - 2 * one == v.num_hidden_layers * 4 * (20**2 - 2 * 10**2) * v.hidden_size
    # Two images of 10 patches cost the linear part of one of 20, but less attention.
    pair = flops.vision_forward_flops(v, BatchShapes.from_patches(1, 8, [10, 10]))
    assert pair == 2 * one


def test_backward_multipliers():
    config = tiny_idefics2_config()
    shapes = BatchShapes.from_patches(rows=2, seq_length=16, image_patches=[16, 12])
    fwd = flops.forward_flops(config, shapes)
    assert flops.training_flops(config, shapes) == 3 * sum(fwd.values())
    only_connector_llm = flops.training_flops(config, shapes, frozen={"vision"})
    assert only_connector_llm == fwd["vision"] + 3 * fwd["connector"] + 3 * fwd["llm"]
    llm_only = flops.training_flops(config, shapes, frozen={"vision", "connector"})
    assert llm_only == fwd["vision"] + fwd["connector"] + 3 * fwd["llm"]
    frozen_llm = flops.training_flops(config, shapes, frozen={"llm"})
    assert frozen_llm == 3 * fwd["vision"] + 3 * fwd["connector"] + 2 * fwd["llm"]
    assert flops.backward_multipliers({"connector"}) == {"vision": 3, "connector": 2, "llm": 3}
    assert flops.backward_multipliers({"connector", "llm"}) == {"vision": 3, "connector": 2, "llm": 2}
    assert flops.backward_multipliers(set(flops.COMPONENTS)) == {"vision": 1, "connector": 1, "llm": 1}
    with pytest.raises(ValueError, match="unknown frozen component"):
        flops.backward_multipliers({"perceiver"})
    # LoRA: every base weight frozen; a component with adapters needs its input gradients (2x), and so
    # does every one downstream of it; one with nothing trainable in or upstream of it runs forward only.
    everything = set(flops.COMPONENTS)
    assert flops.backward_multipliers(everything, {"llm"}) == {"vision": 1, "connector": 1, "llm": 2}
    assert flops.backward_multipliers(everything, {"vision"}) == {"vision": 2, "connector": 2, "llm": 2}
    assert flops.backward_multipliers({"vision", "llm"}, {"llm"}) == {"vision": 1, "connector": 3, "llm": 2}
    lora = flops.training_flops(config, shapes, frozen=everything, adapted={"llm"})
    assert lora == fwd["vision"] + fwd["connector"] + 2 * fwd["llm"]


def test_batch_shapes_from_collated_batch_counts_real_patches():
    p = tiny_idefics2_config().vision_config.patch_size
    samples = [
        {"tokens": torch.arange(5), "labels": torch.arange(5), "loss_mask": torch.ones(5),
         "position_ids": torch.arange(5), "pixel_values": [torch.rand(3, 56, 42), torch.rand(3, 28, 28)]},
        {"tokens": torch.arange(3), "labels": torch.arange(3), "loss_mask": torch.ones(3),
         "position_ids": torch.arange(3), "pixel_values": [torch.rand(3, 30, 56)]},  # 30 = 2 full patch rows
        {"tokens": torch.arange(4), "labels": torch.arange(4), "loss_mask": torch.ones(4),
         "position_ids": torch.arange(4), "pixel_values": []},
    ]
    batch = collate(samples, seq_length=8, pad_token_id=0)
    assert batch["pixel_values"].shape[-2:] == (56, 56)  # padded: 16 patches per slot
    shapes = BatchShapes.from_batch(batch, p)
    assert shapes == BatchShapes.from_patches(rows=3, seq_length=8, image_patches=[12, 4, 8])
    assert (shapes.num_images, shapes.patches, shapes.patches_squared) == (3, 24, 144 + 16 + 64)

    text_only = collate(samples[2:], seq_length=8, pad_token_id=0)
    assert BatchShapes.from_batch(text_only, p) == BatchShapes(rows=1, seq_length=8)


def test_batch_shapes_sum_and_tensor_round_trip():
    a = BatchShapes.from_patches(2, 16, [4, 9])
    b = BatchShapes.from_patches(2, 16, [16])
    total = BatchShapes.total([a, b])
    assert total == BatchShapes.from_patches(4, 16, [4, 9, 16])
    # All-reduce over DP ranks is a SUM of these tensors.
    reduced = a.to_tensor() + b.to_tensor()
    assert BatchShapes.from_tensor(reduced, seq_length=16) == total
    with pytest.raises(ValueError, match="seq_length"):
        a + BatchShapes(1, 32)


def test_peak_table_and_mfu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_tflops("NVIDIA A10G") == 125.0
    assert flops.peak_tflops("NVIDIA L40S") == 362.0
    assert flops.peak_tflops(None) is None
    assert flops.peak_tflops("Some Future GPU") is None
    if not torch.cuda.is_available():
        assert flops.device_name() is None
    assert flops.tflops_per_device(8e12, 2.0, 4) == pytest.approx(1.0)
    assert flops.mfu(8e12, 2.0, 4, 989.0) == pytest.approx(1.0 / 989.0)
    assert flops.mfu(8e12, 2.0, 4, None) is None
