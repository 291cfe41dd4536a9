"""A checkpoint converted at TP=2 x PP=2 loads for training at other layouts, and saves again.

The Megatron model built at (1,1) (two data-parallel ranks) and at (2,1) loads the (2,2) checkpoint
through `load_model_weights`; its outputs must match transformers on the original HF checkpoint.
Training saves at (2,1) and then (1,1) with two data-parallel ranks must load at (1,2) and convert
back to HF bit-exactly.
"""
from __future__ import annotations

import pytest
import torch

from megatron_patch.checkpoint import read_tracker
from tests.checkpoint import reshard_cases as cases
from tests.checkpoint.fixtures import idefics2_config, save_idefics2, tool
from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.distributed


TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    model = save_idefics2(root / "hf", idefics2_config("llama", tied=True), seed=3)
    args = ["--load-path", str(root / "hf"), "--save-path", str(root / "mg22"),
            "--target-tensor-model-parallel-size", "2", "--target-pipeline-model-parallel-size", "2"]
    assert tool("idefics2/hf2mcore.py").main(args) == 0
    return root, model


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_tp2_pp2_checkpoint_loads_at_other_layouts(converted, tp, pp):
    root, _ = converted
    diffs = run_distributed(2, cases.load_and_compare, str(root / "mg22"), str(root / "hf"), tp, pp)[0]
    assert diffs["iteration"] == "release"
    assert diffs["logits"] < TOLERANCE, diffs
    assert diffs["vision"] < TOLERANCE and diffs["connector"] < TOLERANCE, diffs


def test_training_save_reshards_and_converts_back_exactly(converted):
    root, original = converted
    run_distributed(2, cases.load_then_save, str(root / "mg22"), str(root / "train"), 2, 1, 5)
    assert read_tracker(root / "train") == 5
    assert (root / "train" / "iter_0000005" / "mp_rank_01" / "model.safetensors.index.json").is_file()

    diffs = run_distributed(2, cases.load_and_compare, str(root / "train"), str(root / "hf"), 1, 2)[0]
    assert diffs["iteration"] == 5 and diffs["logits"] < TOLERANCE, diffs

    # (1,1) on two ranks: data-parallel rank 1 must not write; iteration 6 is built from iteration 5
    run_distributed(2, cases.load_then_save, str(root / "train"), str(root / "train"), 1, 1, 6)
    assert read_tracker(root / "train") == 6
    assert sorted(p.name for p in (root / "train" / "iter_0000006").iterdir()) == [
        "checkpoint_info.json", "hf_config", "mp_rank_00"
    ]
    assert tool("idefics2/mcore2hf.py").main(["--load-path", str(root / "train"), "--save-path", str(root / "back")]) == 0
    from transformers import Idefics2ForConditionalGeneration

    back = Idefics2ForConditionalGeneration.from_pretrained(str(root / "back")).state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_every_weight_of_the_model_must_come_from_a_full_checkpoint(converted):
    root, _ = converted
    error = run_distributed(1, cases.load_into_a_model_with_an_unmapped_weight, str(root / "mg22"))[0]
    assert error is not None and "have no HF source, first: connector.stray" in error
