"""Exact resume: a run killed by SIGKILL after its checkpoint and resumed with --load logs the
uninterrupted run's losses and grad norms bit for bit; a run saved at one (TP, PP, DP) resumes at
another with its optimizer state intact and the same next losses (fp32 tolerance). Both with torch's
Adam (step per parameter) and with an Adam that keeps its step in the param group, as
transformer-engine's and apex's FusedAdam do."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed_harness import free_port, run_distributed
from tests.training.fixtures import REPO, train_flags, training_inputs
from tests.training.group_step_adam import train_with_group_step_adam
from tests.training.process_tree import kill_tree
from tests.training.runs import by_iteration, loaded_optimizer_state, saved_optimizer_state, train, who_loads

pytestmark = pytest.mark.e2e


ENTRY = str(REPO / "examples" / "idefics2" / "pretrain_megatron_idefics2.py")
GROUP_STEP_ADAM = str(REPO / "tests" / "training" / "group_step_adam.py")
KEYS = ("param", "exp_avg", "exp_avg_sq")
TRAIN = {"torch-adam": train, "group-step-adam": train_with_group_step_adam}


def _torchrun(flags, adam, log):
    """The entry point under torchrun, 4 workers; `adam` picks the optimizer class megatron-core builds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = [GROUP_STEP_ADAM, ENTRY] if adam == "group-step-adam" else [ENTRY]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           *script, *flags]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _finish(proc, log, what) -> str:
    proc.wait(timeout=600)
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{what} failed:\n{out[-3000:]}"
    return out


def _values(metrics):
    return {i: (r["lm_loss"], r["grad_norm"]) for i, r in sorted(by_iteration(metrics).items())}


@pytest.mark.parametrize("adam", sorted(TRAIN))
def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tmp_path, adam):
    inputs = training_inputs()
    iters = 6
    layout = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--overlap-grad-reduce",
              "--save-interval", "2"]
    # The uninterrupted run on the pooled ranks (one thread each, like OMP_NUM_THREADS=1 below).
    run_distributed(4, TRAIN[adam], train_flags(inputs, tmp_path / "full", iters=iters, extra=layout))

    killed_dir = tmp_path / "killed"
    killed = _torchrun(train_flags(inputs, killed_dir, iters=iters, extra=layout), adam, tmp_path / "killed.log")
    deadline = time.time() + 300
    while not (killed_dir / "iter_0000002").is_dir():  # published by one rename once complete
        assert killed.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # a random moment after the first checkpoint
    pids = kill_tree(killed.pid)  # torchrun, its workers (sessions of their own) and anything they started
    killed.wait()
    assert len(pids) >= 5, pids  # torchrun and its 4 workers at least
    saved = int((killed_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < iters, f"the run had checkpointed iteration {saved} of {iters}: nothing left to resume"
    (killed_dir / "metrics.jsonl").rename(tmp_path / "killed_metrics.jsonl")  # may end in half a line

    resumed = train_flags(inputs, killed_dir, iters=iters, extra=layout + ["--load", str(killed_dir)])
    out = _finish(_torchrun(resumed, adam, tmp_path / "resumed.log"), tmp_path / "resumed.log", "resumed run")
    assert re.search(rf"resumed \S*iter_{saved:07d}: iteration {saved},", out), out[-3000:]
    want, got = _values(tmp_path / "full" / "metrics.jsonl"), _values(killed_dir / "metrics.jsonl")
    assert sorted(got) == list(range(saved + 1, iters + 1))  # the resumed run trained from the middle
    assert got == {i: want[i] for i in got}  # bit-identical lm_loss and grad_norm at every iteration


@pytest.mark.parametrize("packed, workers", [(False, 2), (True, 0), (True, 2)],
                         ids=["unpacked-2workers", "packed-0workers", "packed-2workers"])
def test_resume_is_bit_identical_packed_and_with_workers(tmp_path, packed, workers):
    inputs = training_inputs()
    extra = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--num-workers", str(workers),
             "--save-interval", "2", "--lr-decay-iters", "4"] + (["--pack-sequences"] if packed else [])
    run_distributed(4, train, train_flags(inputs, tmp_path / "full", iters=4, extra=extra))
    run_distributed(4, train, train_flags(inputs, tmp_path / "part", iters=2, extra=extra))
    run_distributed(4, train, train_flags(inputs, tmp_path / "part", iters=4,
                                          extra=extra + ["--load", str(tmp_path / "part")]))
    want, got = _values(tmp_path / "full" / "metrics.jsonl"), _values(tmp_path / "part" / "metrics.jsonl")
    assert got == want and sorted(got) == [1, 2, 3, 4]


@pytest.fixture(scope="module", params=sorted(TRAIN))
def saved_at_1_2_2(request, tmp_path_factory):
    """4 iterations at TP1 x PP2 x DP2 (distributed optimizer), saved at 2, with each kind of Adam."""
    root = tmp_path_factory.mktemp("layouts")
    inputs = training_inputs()
    extra = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save-interval", "2"]
    run_distributed(4, TRAIN[request.param], train_flags(inputs, root / "run", iters=4, extra=extra))
    return inputs, root, request.param


@pytest.mark.parametrize("world, layout", [(4, ["--tensor-model-parallel-size", "2"]), (1, [])], ids=["tp2-dp2", "dp1"])
def test_resume_at_another_layout_keeps_optimizer_state(saved_at_1_2_2, tmp_path, world, layout):
    inputs, root, adam = saved_at_1_2_2
    assert json.loads((root / "run" / "iter_0000002" / "train_state.json").read_text())["optimizer_step"] == 2
    saved = saved_optimizer_state(root / "run" / "iter_0000002", KEYS)
    flags = train_flags(inputs, tmp_path / "resumed", iters=4,
                        extra=layout + ["--use-distributed-optimizer", "--load", str(root / "run"), "--iteration", "2"])
    loaded = run_distributed(world, loaded_optimizer_state, flags)[0]
    for key in KEYS:
        assert sorted(loaded[key]) == sorted(saved[key])
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), (key, name)
    assert float(saved["exp_avg_sq"]["lm_head.weight"].abs().sum()) > 0  # real moments, not zeros

    run_distributed(world, TRAIN[adam], flags)
    want = by_iteration(root / "run" / "metrics.jsonl")
    got = by_iteration(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(got) == [3, 4]
    for i in (3, 4):
        assert got[i]["lm_loss"] == pytest.approx(want[i]["lm_loss"], rel=1e-5)
        assert got[i]["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-4)


def test_only_tp_rank0_of_the_first_stage_loads_and_resume_stays_exact_at_tp2_pp2_dp2(tmp_path):
    inputs = training_inputs()
    extra = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--pack-sequences",
             "--save-interval", "2", "--lr-decay-iters", "4"]
    loaders = run_distributed(8, who_loads, train_flags(inputs, tmp_path / "probe", iters=4, extra=extra))
    assert sorted(set(loaders)) == [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False)]
    assert sum(has for _, _, has in loaders) == 2  # one loader per DP replica
    run_distributed(8, train, train_flags(inputs, tmp_path / "full", iters=4, extra=extra))
    run_distributed(8, train, train_flags(inputs, tmp_path / "part", iters=2, extra=extra))
    assert sorted(p.name for p in (tmp_path / "part" / "iter_0000002" / "loader").iterdir()) == ["dp_000.json", "dp_001.json"]
    run_distributed(8, train, train_flags(inputs, tmp_path / "part", iters=4, extra=extra + ["--load", str(tmp_path / "part")]))
    want, got = _values(tmp_path / "full" / "metrics.jsonl"), _values(tmp_path / "part" / "metrics.jsonl")
    assert got == want and sorted(got) == [1, 2, 3, 4]
