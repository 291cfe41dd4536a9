"""Periodic evaluation, more than once in a run: each evaluation covers the whole validation set
again (the validation loader starts over), so every record is finite and counts the same tokens."""
from __future__ import annotations

import math

import pytest

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import train, validation

pytestmark = pytest.mark.distributed


def test_every_periodic_evaluation_covers_the_whole_validation_set(tmp_path):
    inputs = training_inputs()
    extra = ["--pipeline-model-parallel-size", "2", "--valid-data-path", str(inputs["valid"]), "--eval-interval", "1"]
    run_distributed(2, train, train_flags(inputs, tmp_path / "run", iters=3, extra=extra))
    records = validation(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["validation_loss"]) for r in records), records
    tokens = {r["validation_tokens"] for r in records}
    assert len(tokens) == 1 and tokens.pop() > 0, records
