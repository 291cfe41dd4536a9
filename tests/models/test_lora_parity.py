"""A peft LoRA adapter (non-zero B) loaded with --lora-load's code gives peft + transformers' numbers."""
from __future__ import annotations

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.models import lora_cases as cases

pytestmark = pytest.mark.distributed

ATOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft_adapter")
    cases.save_peft_adapter(folder)
    return folder, cases.peft_reference(folder)


@pytest.fixture(scope="module")
def partial_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft_partial_adapter")
    cases.save_peft_adapter(folder, rank=3, alpha=6.0, targets=cases.SOME_TARGETS)
    return folder, cases.peft_reference(folder)


@pytest.fixture(scope="module")
def all_linear_adapter(tmp_path_factory):
    # peft's "all-linear": every linear but the head, so the vision tower's, the perceiver's (its fused kv
    # included) and the modality projection's too.
    folder = tmp_path_factory.mktemp("peft_all_linear_adapter")
    cases.save_peft_adapter(folder, rank=3, alpha=6.0, targets="all-linear")
    return folder, cases.peft_reference(folder)


def _check_grads(grads, reference):
    assert set(grads) == set(reference["grads"])  # every layer's adapters (A, B), under peft's names
    for key, ref in reference["grads"].items():
        scale = float(ref.abs().max())
        assert scale > 0, key  # the adapter learns from this batch
        assert torch.allclose(grads[key], ref, atol=1e-4 * scale, rtol=1e-4), key  # fp32 sums in another order


def test_adapter_changes_the_logits(adapter):
    from megatron_patch.testing.parity import hf_outputs, random_inputs
    from tests.models.idefics2_cases import tiny_hf_model

    folder, reference = adapter
    config, base = tiny_hf_model(cases.TEXT, False)
    plain = hf_outputs(base, random_inputs(config, batch_size=2, num_images=2, text_tokens=12, seed=7))["logits"]
    assert float((plain - reference["logits"]).abs().max()) > 0.1  # a parity check on a no-op adapter proves nothing


@pytest.mark.parametrize("tp,pp,first_stage_layers", [(2, 2, None), (1, 1, None), (1, 2, 1)])
def test_logits_match_peft(adapter, tp, pp, first_stage_layers):
    # (1, 2, 1): one of the 4 layers on stage 0, so stage 1's local layer 0 is global layer 1.
    folder, reference = adapter
    logits = run_distributed(tp * pp, cases.lora_logits_case, folder, tp, pp,
                             decoder_first_pipeline_num_layers=first_stage_layers)[0]
    assert float((logits - reference["logits"]).abs().max()) < ATOL


def test_loss_and_adapter_grads_match_peft_at_tp2_pp2(adapter):
    folder, reference = adapter
    loss, grads, trainable = run_distributed(4, cases.lora_loss_and_grads_case, folder, 2, 2)[0]
    assert abs(loss - reference["loss"]) < 1e-5
    _check_grads(grads, reference)
    assert trainable and all(".lora_" in name for name in trainable)  # the base is frozen


def test_sequence_parallel_matches_peft(adapter):
    folder, reference = adapter
    logits = run_distributed(2, cases.lora_logits_case, folder, 2, 1, sequence_parallel=True)[0]
    assert float((logits - reference["logits"]).abs().max()) < ATOL
    loss, grads, _ = run_distributed(2, cases.lora_loss_and_grads_case, folder, 2, 1, sequence_parallel=True)[0]
    assert abs(loss - reference["loss"]) < 1e-5
    _check_grads(grads, reference)


def test_some_projections_of_fused_linears(partial_adapter):
    # q and v without k on linear_qkv, up without gate on linear_fc1: the others' places get zeros.
    folder, reference = partial_adapter
    assert len(reference["grads"]) == 4 * 4 * 2
    logits = run_distributed(4, cases.lora_logits_case, folder, 2, 2)[0]
    assert float((logits - reference["logits"]).abs().max()) < ATOL
    loss, grads, _ = run_distributed(4, cases.lora_loss_and_grads_case, folder, 2, 2)[0]
    assert abs(loss - reference["loss"]) < 1e-5
    _check_grads(grads, reference)


def test_adapters_on_every_component_match_peft(all_linear_adapter):
    folder, reference = all_linear_adapter
    components = {name.split(".")[3] for name in reference["grads"]}  # base_model.model.model.<component>...
    assert components == {"vision_model", "connector", "text_model"}
    assert any("modality_projection" in name for name in reference["grads"])
    logits = run_distributed(4, cases.lora_logits_case, folder, 2, 2)[0]
    assert float((logits - reference["logits"]).abs().max()) < ATOL
    loss, grads, trainable = run_distributed(4, cases.lora_loss_and_grads_case, folder, 2, 2)[0]
    assert abs(loss - reference["loss"]) < 1e-5
    _check_grads(grads, reference)
    assert trainable and all(".lora_" in name for name in trainable)
    loss, grads, _ = run_distributed(2, cases.lora_loss_and_grads_case, folder, 2, 1, sequence_parallel=True)[0]
    assert abs(loss - reference["loss"]) < 1e-5
    _check_grads(grads, reference)


@pytest.fixture(scope="module")
def saved_modules_adapter(tmp_path_factory):
    # peft's modules_to_save: the connector trains fully beside the language model's adapters.
    folder = tmp_path_factory.mktemp("peft_modules_to_save_adapter")
    cases.save_peft_adapter(folder, modules_to_save=["connector"])
    return folder, cases.peft_reference(folder)


def test_modules_to_save_match_peft(saved_modules_adapter):
    folder, reference = saved_modules_adapter
    connector = [name for name in reference["grads"] if ".connector." in name]
    assert connector and all(".lora_" not in name for name in connector)  # trained whole, not adapted
    logits = run_distributed(4, cases.lora_logits_case, folder, 2, 2)[0]
    assert float((logits - reference["logits"]).abs().max()) < ATOL
    loss, grads, trainable = run_distributed(2, cases.lora_loss_and_grads_case, folder, 1, 2)[0]
    assert abs(loss - reference["loss"]) < 1e-5
    _check_grads(grads, reference)
    assert {n.split(".")[0] for n in trainable if ".lora_" not in n} == {"connector"}
