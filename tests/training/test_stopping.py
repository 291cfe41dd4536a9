"""Stopping early and keeping few checkpoints: the exit signal (sent to torchrun and every worker,
as SLURM does, with the launcher's torchrun settings), --exit-duration-in-mins, --exit-interval and
--save-total-limit, each with a resume that matches the uninterrupted run bit for bit."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_patch.checkpoint.layout import prune_iterations, read_tracker
from tests.distributed_harness import free_port, run_distributed
from tests.training.fixtures import REPO, train_flags, training_inputs
from tests.training.runs import by_iteration, train

pytestmark = pytest.mark.e2e


LAUNCHER = REPO / "examples" / "idefics2" / "pretrain_idefics2.sh"
PP2_DP2 = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]


def _values(metrics):
    return {i: (r["lm_loss"], r["grad_norm"]) for i, r in sorted(by_iteration(metrics).items())}


def _folders(save):
    return sorted(p.name for p in save.iterdir() if p.is_dir())


def _launch(inputs, flags, log, iters):
    """The real launcher (torchrun with its signal settings), 4 CPU workers; `flags` come last and win."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NNODES": "1", "GPUS_PER_NODE": "4",
           "MASTER_PORT": str(free_port()), "TP": "1", "PP": "2", "MBS": "1", "GBS": "4",
           "SEQ_LEN": "64", "TRAIN_ITERS": str(iters), "LR": "1e-3", "MIN_LR": "1e-4", "WARMUP_ITERS": "1",
           "NUM_WORKERS": "0", "DIST_FLAGS": "", "FREEZE": "", "OVERLAP": "0", "EXIT_SIGNAL": "SIGTERM", "AUTO_RESUME": "0",
           "LOAD": str(inputs["mg"]), "SAVE": flags[flags.index("--save") + 1], "DATA_PATH": str(inputs["train"])}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen(["bash", str(LAUNCHER), *flags], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def test_sigterm_to_torchrun_and_every_worker_saves_the_iteration_and_resumes_exactly(tmp_path):
    inputs = training_inputs()
    iters, run = 10, tmp_path / "signalled"
    run_distributed(4, train, train_flags(inputs, tmp_path / "full", iters=iters, extra=PP2_DP2))

    flags = train_flags(inputs, run, iters=iters, extra=PP2_DP2 + ["--save-interval", "2"])
    proc, log = _launch(inputs, flags, tmp_path / "run.log", iters), tmp_path / "run.log"
    deadline = time.time() + 300
    while not (run / "iter_0000002").is_dir():  # published by one rename once complete
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.2))
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)  # the workers run in sessions of their own
    assert len(tree) >= 5, tree
    for p in tree:  # as SLURM signals every process of the job step
        p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    psutil.wait_procs(tree, timeout=30)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    out = log.read_text(errors="replace")
    stopped = int(re.search(rf"stopped after iteration (\d+) of {iters}: received SIGTERM", out).group(1))
    assert 2 <= stopped < iters and read_tracker(run) == stopped, out[-3000:]
    assert max(by_iteration(run / "metrics.jsonl")) == stopped

    run_distributed(4, train, train_flags(inputs, run, iters=iters, extra=PP2_DP2 + ["--load", str(run)]))
    want, got = _values(tmp_path / "full" / "metrics.jsonl"), _values(run / "metrics.jsonl")
    assert got == want and sorted(got) == list(range(1, iters + 1))


def _late_start_on_rank1(ctx):
    """Rank 1 alone believes it started an hour ago: the ranks must still stop together."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        ctx.start_time -= 3600
    return None


def _sigterm_to_rank1_during_save_2(ctx):
    """Rank 1 alone gets SIGTERM in the middle of the periodic save at iteration 2."""
    import torch.distributed as dist

    from megatron_patch.training.checkpointer import Checkpointer

    original = Checkpointer.save

    def save(self):
        if dist.get_rank() == 1 and self.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    Checkpointer.save = save
    return lambda: setattr(Checkpointer, "save", original)


STOPS = [  # (name, flags, patch, iteration it stops after)
    ("duration", ["--exit-duration-in-mins", "30"], _late_start_on_rank1, 1),
    ("interval", ["--exit-interval", "3"], None, 3),
    ("signal-in-save", ["--exit-signal-handler", "--save-interval", "2"], _sigterm_to_rank1_during_save_2, 2),
]


def test_exit_duration_interval_and_a_signal_during_a_save_stop_with_a_resumable_checkpoint(tmp_path):
    inputs = training_inputs()
    iters, extra = 4, ["--lr-decay-iters", "4"]
    run_distributed(2, train, train_flags(inputs, tmp_path / "full", iters=iters, extra=extra))
    want = _values(tmp_path / "full" / "metrics.jsonl")
    for name, stop, patch, stopped in STOPS:
        save = tmp_path / name
        run_distributed(2, train, train_flags(inputs, save, iters=iters, extra=extra + stop), patch=patch, timeout=60)
        assert read_tracker(save) == stopped and _folders(save) == [f"iter_{stopped:07d}"], name
        assert sorted(by_iteration(save / "metrics.jsonl")) == list(range(1, stopped + 1)), name
        run_distributed(2, train, train_flags(inputs, save, iters=iters, extra=extra + ["--load", str(save)]))
        assert _values(save / "metrics.jsonl") == want, name


def test_save_total_limit_keeps_the_newest_and_release(tmp_path):
    inputs = training_inputs()
    save = tmp_path / "run"
    (save / "release").mkdir(parents=True)  # a converted checkpoint kept beside the run's saves
    run_distributed(1, train, train_flags(inputs, save, iters=4, extra=["--save-interval", "1", "--save-total-limit", "2"]))
    assert _folders(save) == ["iter_0000003", "iter_0000004", "release"] and read_tracker(save) == 4


def test_prune_keeps_the_tracker_iteration(tmp_path):
    for i in (1, 2, 5, 7):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2\n")  # e.g. a resume from --iteration 2
    assert prune_iterations(tmp_path, 1) == [1, 5]
    assert _folders(tmp_path) == ["iter_0000002", "iter_0000007"]


KILL_DURING_DELETION = """
import os, shutil, signal, sys
from megatron_patch.checkpoint import layout
def rmtree(path, *args, **kwargs):
    if "iter_0000001" in os.path.basename(path):  # the folder half removed, then the process killed
        os.remove(os.path.join(path, "checkpoint_info.json"))
        os.kill(os.getpid(), signal.SIGKILL)
    return shutil.rmtree(path, *args, **kwargs)
layout.shutil = type("shutil", (), {"rmtree": staticmethod(rmtree)})
from tests.training.runs import train
train(sys.argv[1:])
"""


def test_kill_during_deletion_leaves_a_loadable_tracker_and_no_half_folder(tmp_path):
    inputs = training_inputs()
    save = tmp_path / "run"
    flags = train_flags(inputs, save, iters=3, extra=["--save-interval", "1", "--save-total-limit", "1",
                                                      "--lr-decay-iters", "3"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_DELETION, *flags], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert read_tracker(save) == 2 and _folders(save) == [".iter_0000001.deleting", "iter_0000002"]
    run_distributed(1, train, train_flags(inputs, save, iters=3, extra=["--load", str(save), "--lr-decay-iters", "3",
                                                                        "--save-total-limit", "1"]))
    assert sorted(by_iteration(save / "metrics.jsonl")) == [1, 2, 3]
    assert _folders(save) == ["iter_0000003"]  # the leftover went with the next save's pruning
