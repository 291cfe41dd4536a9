"""The entry point as users run it: bad flags and bad resumes end in one line, not tracebacks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.distributed_harness import run_distributed
from tests.training.fixtures import REPO, train_flags, training_inputs
from tests.training.runs import train

pytestmark = pytest.mark.e2e


ENTRY = str(REPO / "examples" / "idefics2" / "pretrain_megatron_idefics2.py")


def _run(flags):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, ENTRY, *flags], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "pretrain_megatron_idefics2: error:" in line]
    return proc, errors


def test_bad_flag_is_one_line_before_anything_is_built(tmp_path):
    flags = train_flags(training_inputs(), tmp_path / "run", mbs=3, gbs=4)  # 4 is not a multiple of 3
    proc, errors = _run(flags)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "--global-batch-size" in errors[0]
    assert "building the model" not in proc.stdout and "Traceback" not in proc.stderr


def test_resume_with_another_schedule_is_one_line(tmp_path):
    inputs = training_inputs()
    run_distributed(1, train, train_flags(inputs, tmp_path / "run", iters=2))
    proc, errors = _run(train_flags(inputs, tmp_path / "run", iters=2, extra=[
        "--load", str(tmp_path / "run"), "--lr", "5e-4", "--lr-decay-iters", "2"]))
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "--lr gives 0.0005 but the checkpoint was trained with 0.001" in errors[0]
    assert "Traceback" not in proc.stderr


def test_resume_with_another_seed_is_one_line(tmp_path):
    inputs = training_inputs()
    run_distributed(1, train, train_flags(inputs, tmp_path / "run", iters=2))
    proc, errors = _run(train_flags(inputs, tmp_path / "run", iters=2, extra=["--load", str(tmp_path / "run"), "--seed", "8"]))
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "--seed 8 differs from the checkpoint's 7" in errors[0]
