"""Perceiver KV heads replicated over TP ranks when TP exceeds them (idefics2-8b: 4 KV heads at TP 8):
the weight mapping, the layout rule, the copies' marks and init, and parity with transformers."""
from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from transformers import Idefics2Config

from megatron_patch.models.idefics2.config import ParallelOptions, validate_layout
from megatron_patch.models.idefics2.kv_replication import COPIES_ATTR
from megatron_patch.models.idefics2.weight_mapping import KV, KVCopyMismatch, hf_to_mcore, mcore_to_hf, tensor_mappings
from megatron_patch.testing.tiny import tiny_idefics2_config
from tests.distributed_harness import run_distributed
from tests.models import idefics2_cases as cases

pytestmark = pytest.mark.distributed


def idefics2_8b_heads(vision_heads=16, perceiver_heads=16, perceiver_kv=4, text_heads=32, text_kv=8) -> Idefics2Config:
    """idefics2-8b's head counts (vision 16; perceiver 16 query / 4 KV; Mistral 32 / 8) at tiny widths."""
    return Idefics2Config(
        vision_config=dict(hidden_size=96, intermediate_size=64, num_hidden_layers=1, num_attention_heads=vision_heads,
                           image_size=28, patch_size=14),
        perceiver_config=dict(hidden_size=192, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=perceiver_heads,
                              resampler_head_dim=8, num_key_value_heads=perceiver_kv),
        text_config=dict(model_type="mistral", hidden_size=192, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=text_heads, num_key_value_heads=text_kv, vocab_size=101),
    )


# ---------------------------------------------------------------- weight mapping


@pytest.mark.parametrize("kv_heads,tp", [(1, 2), (1, 4), (2, 4), (4, 8), (4, 16)])
def test_mapping_round_trip_is_bit_exact_when_tp_exceeds_kv_heads(kv_heads, tp):
    config = idefics2_8b_heads(perceiver_kv=kv_heads)
    m = next(m for m in tensor_mappings(config) if m.split == KV)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(kv_heads * 8, 192, generator=g) for _ in range(2))
    shards = [hf_to_mcore(m, [k, v], r, tp) for r in range(tp)]
    copies = tp // kv_heads
    for r, shard in enumerate(shards):  # rank r holds [k_g; v_g] of group r // copies
        group = r // copies
        assert torch.equal(shard, torch.cat([k[group * 8:(group + 1) * 8], v[group * 8:(group + 1) * 8]]))
    back = mcore_to_hf(m, shards)
    assert torch.equal(back[0], k) and torch.equal(back[1], v)


def test_differing_copies_are_refused_in_one_line():
    config = idefics2_8b_heads()
    m = next(m for m in tensor_mappings(config) if m.split == KV)
    k, v = torch.randn(32, 192), torch.randn(32, 192)
    shards = [hf_to_mcore(m, [k, v], r, 8).clone() for r in range(8)]
    shards[5][3, 7] += 1e-6  # rank 5 holds the second copy of group 2 (ranks 4 and 5)
    with pytest.raises(KVCopyMismatch) as err:
        mcore_to_hf(m, shards)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(m.mcore) and "TP rank 5" in message and "KV group 2" in message and "TP rank 4" in message


def test_only_the_perceiver_replicates_kv_heads():
    config = idefics2_8b_heads()
    text_qkv = next(m for m in tensor_mappings(config) if m.mcore.startswith("language_model") and m.mcore.endswith("linear_qkv.weight"))
    meta = [torch.empty(s, device="meta") for s in ((32 * 6, 192), (8 * 6, 192), (8 * 6, 192))]
    with pytest.raises(ValueError, match="cannot hold 8 query groups"):
        hf_to_mcore(text_qkv, meta, 0, 16)


# ---------------------------------------------------------------- layout rule


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_idefics2_8b_heads_accepted_up_to_tp8(tp):
    validate_layout(idefics2_8b_heads(), ParallelOptions(tp), world_size=8)


def test_perceiver_accepts_tp16_and_the_text_model_refuses_it():
    validate_layout(idefics2_8b_heads(text_kv=16), ParallelOptions(16))  # the perceiver's 4 KV heads, 4 copies each
    with pytest.raises(ValueError) as err:
        validate_layout(idefics2_8b_heads(), ParallelOptions(16))
    assert "does not divide the text num_key_value_heads (8)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("config,tp,expected", [
    (idefics2_8b_heads(), 3, "--tensor-model-parallel-size 3 does not divide the vision num_attention_heads (16)"),
    # 24 query heads split over 6 ranks, but 4 KV heads neither split nor replicate evenly over 6
    (idefics2_8b_heads(vision_heads=48, perceiver_heads=24, text_heads=48, text_kv=6), 6,
     "--tensor-model-parallel-size 6 and the perceiver num_key_value_heads (4) must divide one another"),
])
def test_tp_that_fits_no_head_count_is_refused_in_one_line(config, tp, expected):
    with pytest.raises(ValueError) as err:
        validate_layout(config, ParallelOptions(tp))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_config_with_one_perceiver_kv_head(tp):
    validate_layout(tiny_idefics2_config("llama", perceiver_kv_heads=1), ParallelOptions(tp))


# ---------------------------------------------------------------- the model's copies


def copies_case(tp: int, init_weights: bool) -> dict:
    """Per rank: each perceiver layer's kv weight, whether it counts as tensor-parallel, its copy count,
    and the parameter table's connector count (a random init, or HF weights loaded)."""
    from megatron_patch.models.idefics2.model import build_model
    from megatron_patch.platform import init_distributed
    from megatron_patch.training.freezing import parameter_table

    init_distributed(tp, 1, seed=1234)
    config, hf_model = cases.tiny_hf_model("llama", False, perceiver_kv_heads=1)
    opts = ParallelOptions(tp)
    model = build_model(config, opts, init_weights=True) if init_weights else cases.build_from_hf(config, hf_model, opts)
    kv = {n: (p.detach().clone(), bool(getattr(p, "tensor_model_parallel", False)), getattr(p, COPIES_ATTR, 1))
          for n, p in model.named_parameters() if "linear_kv" in n}
    return {"rank": parallel_state.get_tensor_model_parallel_rank(), "kv": kv,
            "connector": parameter_table(model, torch.device("cpu"))["connector"][0],
            "hf_connector": sum(p.numel() for n, p in hf_model.named_parameters() if ".connector." in n)}


@pytest.mark.parametrize("init_weights", [True, False], ids=["random-init", "loaded"])
def test_copies_start_identical_and_only_the_first_counts(init_weights):
    results = run_distributed(4, copies_case, 4, init_weights)
    reference = results[0]["kv"]
    assert len(reference) == 2  # two perceiver layers
    for result in results:
        for name, (weight, counted, copies) in result["kv"].items():
            assert copies == 4 and counted == (result["rank"] == 0), (name, result["rank"])
            assert torch.equal(weight, reference[name][0]), (name, result["rank"])
        # each HF weight once in the start-up table (the copies on ranks 1-3 are TP duplicates)
        assert result["connector"] == result["hf_connector"]
    if not init_weights:
        assert float(reference[next(iter(reference))][0].abs().sum()) > 0


# ---------------------------------------------------------------- parity with transformers


# (text backbone, TP, PP, perceiver KV heads): 2 or 4 copies of one head, and 2 heads of 2 copies each
KV_LAYOUTS = [("mistral", 2, 1, 1), ("llama", 4, 1, 2), ("llama", 4, 1, 1), ("mistral", 2, 2, 1)]


@pytest.mark.parametrize("text,tp,pp,kv_heads", KV_LAYOUTS[:2])
def test_forward_parity_when_tp_exceeds_perceiver_kv_heads(text, tp, pp, kv_heads):
    diffs = run_distributed(tp * pp, cases.parity_case, text, tp, pp, 2, perceiver_kv_heads=kv_heads)[0]
    assert diffs["logit_std"] > 0.1, diffs
    for component in ("vision", "connector", "logits"):
        assert diffs[component] < 1e-4, (component, diffs)


@pytest.mark.parametrize("text,tp,pp,kv_heads", KV_LAYOUTS[1:])
def test_loss_and_every_gradient_match_transformers(text, tp, pp, kv_heads):
    # Through DDP and training's grad finalisation, which sums each KV head's copies over TP.
    hf_loss, hf_grads = cases.hf_loss_and_grads(text, perceiver_kv_heads=kv_heads)
    loss, grads = run_distributed(tp * pp, cases.loss_and_grads_case, text, tp, pp, ddp=True,
                                  perceiver_kv_heads=kv_heads)[0]
    assert abs(loss - hf_loss) < 1e-5
    assert set(grads) == set(hf_grads)
    for name, ref in hf_grads.items():
        scale = max(float(ref.abs().max()), 1.0)
        assert torch.allclose(grads[name], ref, atol=1e-5 * scale, rtol=1e-4), name
    kv_grad = next(g for n, g in grads.items() if "perceiver_resampler.layers.0.self_attn.k_proj" in n)
    assert float(kv_grad.abs().max()) > 0


# ---------------------------------------------------------------- converters


def _kv_tensor_files(mg, tp: int) -> list:
    """(rank folder, safetensors file, name) of layer 0's kv weight on each TP rank of a release checkpoint."""
    import json

    name = "connector.perceiver.layers.0.self_attention.linear_kv.weight"
    out = []
    for r in range(tp):
        rank_dir = mg / "release" / f"mp_rank_{r:02d}"
        index = json.loads((rank_dir / "model.safetensors.index.json").read_text())
        out.append((rank_dir, rank_dir / index["weight_map"][name], name))
    return out


@pytest.mark.parametrize("config,tp", [(tiny_idefics2_config("llama", perceiver_kv_heads=1), 4),
                                       (idefics2_8b_heads(), 8)], ids=["tiny-kv1-tp4", "idefics2-8b-heads-tp8"])
def test_hf2mcore_then_mcore2hf_is_bit_exact(tmp_path, config, tp):
    from safetensors.torch import load_file

    from tests.checkpoint.fixtures import assert_bit_exact, round_trip, save_idefics2

    save_idefics2(tmp_path / "hf", config)
    mg, back = round_trip(tmp_path / "hf", tmp_path, tp, 1)
    assert_bit_exact(tmp_path / "hf", back, config)
    kv = [load_file(str(f))[name] for _, f, name in _kv_tensor_files(mg, tp)]
    copies = tp // config.perceiver_config.num_key_value_heads
    assert all(torch.equal(kv[r], kv[r // copies * copies]) for r in range(tp))


def test_mcore2hf_refuses_a_perturbed_copy_in_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tests.checkpoint.cli import error_line, hf2mcore, mcore2hf
    from tests.checkpoint.fixtures import save_idefics2

    save_idefics2(tmp_path / "hf", tiny_idefics2_config("llama", perceiver_kv_heads=1))
    assert hf2mcore(tmp_path / "hf", tmp_path / "mg", 4, 1) == 0
    _, path, name = _kv_tensor_files(tmp_path / "mg", 4)[2]
    tensors = load_file(str(path))
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(path))
    capsys.readouterr()
    assert mcore2hf(tmp_path / "mg", tmp_path / "back") == 1
    line = error_line(capsys)
    assert name in line and "TP rank 2" in line and str(tmp_path / "mg" / "release") in line, line
