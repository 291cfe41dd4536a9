"""LoRA training against peft: from a peft adapter with non-zero B (`--lora-load`), plain SGD steps
of our training code at (TP, PP, DP) = (2, 1, 2) and (1, 2, 2) give the per-iteration losses of
peft + transformers' own SGD steps on the same global batches (rel 1e-5), and the adapters our last
checkpoint holds, exported by `mcore2hf --adapter-only`, equal peft's trained adapter key for key (max
abs 1e-6; tests/checkpoint/test_lora_export.py loads such an export in peft). The reference is
tests/training/lora_reference.py: only the batches come from our data pipeline."""
from __future__ import annotations

import pytest

from tests.checkpoint.cli import mcore2hf
from tests.distributed_harness import run_distributed
from tests.models.lora_cases import save_peft_adapter
from tests.training.fixtures import train_flags, training_inputs
from tests.training.lora_reference import global_batches, peft_sgd
from tests.training.runs import by_iteration, train
from tests.training.test_loss_freezing import SGD_STEP

pytestmark = pytest.mark.e2e

# lr 0.2: the loss falls by ~0.9 in 3 steps while fp32 rounding alone (peft in fp32 against peft in
# fp64) moves the adapters by ~1e-7; at lr 0.5 that is ~7e-7, too close to the 1e-6 bound.
ITERS, LR = 3, 0.2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(flags(save, tp, pp) of a run from the adapter, peft's per-step losses, peft's trained adapter)."""
    inputs = training_inputs()
    adapter = tmp_path_factory.mktemp("peft_adapter")
    # peft's adapter on the text model, A and B random: made on lora_cases' tiny Idefics2, whose text
    # model has the fixture's shapes (peft and --lora-load both refuse an adapter that does not fit).
    save_peft_adapter(adapter, rank=4, alpha=8.0)

    def flags(save, tp=1, pp=1):
        sgd = SGD_STEP + ["--lr", str(LR), "--min-lr", str(LR), "--lora-load", str(adapter)]
        return train_flags(inputs, save, tp=tp, pp=pp, iters=ITERS, mbs=1, gbs=4, extra=sgd)

    losses, state = peft_sgd(inputs["hf"], adapter, global_batches(flags(adapter / "unused"), ITERS), LR)
    return flags, losses, state


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2-pp1-dp2", "tp1-pp2-dp2"])
def test_lora_sgd_steps_match_peft(reference, tmp_path, tp, pp):
    from safetensors.torch import load_file

    flags, want_losses, want_adapter = reference
    run_distributed(4, train, flags(tmp_path, tp, pp))
    records = by_iteration(tmp_path / "metrics.jsonl")
    assert sorted(records) == list(range(1, ITERS + 1))
    losses = [records[i]["lm_loss"] for i in sorted(records)]
    assert abs(want_losses[-1] - want_losses[0]) > 0.1  # the steps change the loss: not a vacuous check
    assert losses == pytest.approx(want_losses, rel=1e-5)

    exported = tmp_path / "adapter"  # the last checkpoint's adapters, as mcore2hf --adapter-only writes them
    assert mcore2hf(tmp_path, exported, "--adapter-only") == 0
    ours = load_file(exported / "adapter_model.safetensors")
    assert set(ours) == set(want_adapter)
    diffs = {key: float((ours[key] - tensor).abs().max()) for key, tensor in want_adapter.items()}
    print(f"max rel loss diff {max(abs(a / b - 1) for a, b in zip(losses, want_losses)):.2e}, "
          f"max abs adapter diff {max(diffs.values()):.2e}")
    assert max(diffs.values()) <= 1e-6, max(diffs.items(), key=lambda kv: kv[1])
