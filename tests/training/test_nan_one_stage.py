"""A non-finite value that only one pipeline stage sees: the last stage's loss is NaN while every
gradient (the first stage's included) is finite. Every stage must skip the step together: no
weight changes anywhere, every rank counts the skip and holds its LR schedule back."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import by_iteration, train

pytestmark = pytest.mark.distributed


NAN_AT = 2


def _nan_loss_report(ctx):
    """runs.train's patch: at iteration NAN_AT the last stage's reported loss is NaN; what backward
    differentiates is untouched, so the gradients stay finite on both stages."""
    from megatron_patch.training import loss as loss_lib

    original = loss_lib.masked_loss_sum

    def poisoned(per_token_loss, loss_mask):
        loss_sum, num_tokens, report = original(per_token_loss, loss_mask)
        if ctx.state.iteration + 1 == NAN_AT:
            report = {key: value * float("nan") for key, value in report.items()}
        return loss_sum, num_tokens, report

    loss_lib.masked_loss_sum = poisoned
    return lambda: setattr(loss_lib, "masked_loss_sum", original)  # pool workers live on: undo


def _train_counting_skips(flags: list):
    """(skipped iterations, LR schedule steps) as this rank counted them."""
    seen = {}

    def patch(ctx):
        seen["ctx"] = ctx
        return _nan_loss_report(ctx)

    train(flags, patch)
    ctx = seen["ctx"]
    return ctx.state.skipped_iterations, ctx.scheduler.num_steps


def test_nan_loss_on_the_last_stage_only_is_skipped_by_every_stage(tmp_path):
    inputs = training_inputs()
    run = tmp_path / "run"
    flags = train_flags(inputs, run, iters=3, extra=["--pipeline-model-parallel-size", "2", "--save-interval", "1",
                                                     "--lr-decay-iters", "3"])
    counts = run_distributed(2, _train_counting_skips, flags)
    records = by_iteration(run / "metrics.jsonl")
    assert math.isnan(records[NAN_AT]["lm_loss"])
    assert math.isfinite(records[NAN_AT]["grad_norm"])  # only the loss was bad: the first stage could have stepped
    for rank_dir in ("mp_rank_00_000", "mp_rank_00_001"):
        before = load_file(str(run / f"iter_{NAN_AT - 1:07d}" / rank_dir / "model-00001.safetensors"))
        after = load_file(str(run / f"iter_{NAN_AT:07d}" / rank_dir / "model-00001.safetensors"))
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{rank_dir}: the skipped step changed {len(changed)} tensors, e.g. {changed[:3]}"
        trained = load_file(str(run / "iter_0000003" / rank_dir / "model-00001.safetensors"))
        assert any(not torch.equal(after[k], trained[k]) for k in after)  # the next step trained again
    assert counts == [(1, 2), (1, 2)]  # both stages: one skip counted, the schedule stepped twice of three
    assert records[NAN_AT]["skipped_iterations"] == records[NAN_AT]["nan_iterations"] == 1
