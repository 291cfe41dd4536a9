"""idefics2-8b and Idefics2-Llama3-8B at every real width and head count, only the depth cut (1 vision
layer, 1 perceiver layer, 2 text layers), against transformers. Vocabularies: idefics2-8b's 32,003;
Idefics2-Llama3's cut to 32,771 for memory (`reference.LLAMA3_CUT_VOCAB`; FULL_WIDTH_LLAMA3_VOCAB=full
runs its real 128,260 on a machine with ~20 GB to spare).

Tiny configs hide head-count and memory problems: here the perceiver's 4 KV heads meet TP 8 (each
rank holds a copy of one KV head), the vocabulary is not a multiple of TP, and every matrix has its
real shape. One reference is built per config (module fixture, `reference.build_reference`) and
shared by the tests; its files are deleted after the config's tests.

Tolerances are set against what transformers does against itself (`floor`: its logits at one thread
vs two threads, measured in the fixture; the issue measured up to 7e-4 between two loads on another
machine) and what fp32 at these widths gives (see the constants).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from megatron_patch.models.idefics2.config import ParallelOptions, validate_layout
from tests.distributed_harness import run_distributed
from tests.full_width import rank_cases
from tests.full_width.reference import build_reference, full_width_config

pytestmark = [pytest.mark.full_width, pytest.mark.distributed]

LOGITS_ATOL = 2e-4
"""Logits of magnitude ~7: 3e-5 relative (measured: 1.8e-5 to 2.2e-5). Above the floor measured here
(0: transformers repeats itself bit for bit on this machine), below the issue's 7e-4 between loads."""
GRAD_RTOL = 1e-4
"""Per tensor: max |ours - transformers| <= GRAD_RTOL x max |transformers| (measured: 5e-6); reductions
of 4,096-14,336 terms per element differ in order between the TP shards and transformers' one matrix."""
STEP_ATOL = 1e-5
"""After w - 1.0 x g with |w| ~ 0.1: the gradient's own difference (measured: 1.4e-6)."""


@pytest.fixture(scope="module", params=["idefics2-8b", "idefics2-llama3-8b"])
def reference(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    facts = run_distributed(1, build_reference, request.param, str(folder))[0]
    facts.update(name=request.param, folder=str(folder), config=full_width_config(request.param))
    yield facts
    shutil.rmtree(folder, ignore_errors=True)


def _needs_tp8(config):
    try:
        validate_layout(config, ParallelOptions(8))
    except ValueError as err:
        pytest.skip(f"TP 8 not accepted yet: {err}")


def test_reference_is_a_real_check(reference):
    # Logits that vary (not a degenerate model) and the floor this group's tolerances are set against.
    print(f"{reference['name']}: logits max {reference['logit_max']:.2f}, std {reference['logit_std']:.2f}, "
          f"floor {reference['floor']:.1e}, loss {reference['loss']:.4f}")
    assert reference["logit_std"] > 0.3 and reference["floor"] <= LOGITS_ATOL, reference


def test_logits_at_tp4_pp2(reference):
    diff = run_distributed(8, rank_cases.logits_case, reference["folder"], 4, 2)[0]
    print(f"{reference['name']} TP4 x PP2: max |logits difference| {diff:.1e} (floor {reference['floor']:.1e})")
    assert diff < LOGITS_ATOL, (diff, reference["floor"])


def test_logits_at_tp8(reference):
    _needs_tp8(reference["config"])
    diff = run_distributed(8, rank_cases.logits_case, reference["folder"], 8, 1)[0]
    print(f"{reference['name']} TP8: max |logits difference| {diff:.1e} (floor {reference['floor']:.1e})")
    assert diff < LOGITS_ATOL, (diff, reference["floor"])


def test_loss_every_gradient_and_one_sgd_step_at_tp8(reference):
    # One SGD step of lr 1 at TP 8 equals transformers' weights minus its gradient (what the same step
    # at TP 1 computes): the replicated perceiver KV copies each received the whole gradient.
    _needs_tp8(reference["config"])
    results = run_distributed(8, rank_cases.grads_and_sgd_step_case, reference["folder"], 8, 1)
    assert results[0]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert all(r["updated"] for r in results)
    worst = {"grad": 0.0, "step": 0.0}
    seen = set()
    for rank, r in enumerate(results):
        for name, (grad_diff, scale, step_diff) in r["diffs"].items():
            assert grad_diff <= GRAD_RTOL * scale and scale > 0, (rank, name, grad_diff, scale)
            assert step_diff <= STEP_ATOL, (rank, name, step_diff)
            worst = {"grad": max(worst["grad"], grad_diff / scale), "step": max(worst["step"], step_diff)}
        seen.update(r["diffs"])
    print(f"{reference['name']}: {len(seen)} tensors; worst gradient difference {worst['grad']:.1e} of the "
          f"tensor's largest, worst stepped weight {worst['step']:.1e}")
    assert any("linear_kv" in name for name in seen) and len(seen) > 40


def test_hf2mcore_then_mcore2hf_is_bit_exact_at_tp8(reference, tmp_path):
    from megatron_patch.conversion.hf_files import HFWeightsReader
    from tests.checkpoint.cli import hf2mcore, mcore2hf

    _needs_tp8(reference["config"])
    src = f"{reference['folder']}/hf"
    assert hf2mcore(src, tmp_path / "mg", 8, 1) == 0
    assert mcore2hf(tmp_path / "mg", tmp_path / "back") == 0
    shutil.rmtree(tmp_path / "mg")
    original, back = HFWeightsReader(src), HFWeightsReader(tmp_path / "back")
    assert sorted(back.names()) == sorted(original.names())
    for name in original.names():  # one tensor at a time
        a, b = original.get(name), back.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    shutil.rmtree(tmp_path / "back")  # 4 GB: pytest keeps the last runs' temporary folders
