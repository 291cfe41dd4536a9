"""--async-save: the state copied at the save iteration and written in the background holds exactly
what a synchronous save writes; a run SIGKILLed at a random moment around its background saves
resumes bit-identically; a failed background write stops every rank with one line and leaves the
previous checkpoint as the tracker's."""
from __future__ import annotations

import random
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_harness import DistributedError, run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.process_tree import kill_tree
from tests.training.runs import train
from tests.training.test_resume import _finish, _torchrun, _values

pytestmark = pytest.mark.e2e

LAYOUT = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save-interval", "2"]


def _folder_contents(folder) -> dict:
    """{relative path: tensors or text} of every file of an iteration folder."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            out[key] = load_file(str(path))
        elif path.suffix == ".pt":
            out[key] = torch.load(path, weights_only=True)
        else:
            out[key] = path.read_bytes()
    return out


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _slow_background_writes(ctx):
    """Background writes start 1.5 s late, so training steps on while the copied state waits."""
    import threading

    from megatron_patch.checkpoint import commit

    original = commit.write

    def write(writers, staging):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(1.5)
        return original(writers, staging)

    commit.write = write
    return lambda: setattr(commit, "write", original)


def test_async_saves_hold_exactly_what_synchronous_saves_write(tmp_path):
    inputs = training_inputs()
    for name, extra, patch in (("sync", [], None), ("async", ["--async-save"], _slow_background_writes)):
        run_distributed(4, train, train_flags(inputs, tmp_path / name, iters=5, extra=LAYOUT + extra), patch)
    for iteration in ("iter_0000002", "iter_0000004", "iter_0000005"):  # interval saves and the last one
        sync, async_ = (_folder_contents(tmp_path / n / iteration) for n in ("sync", "async"))
        assert sync.keys() == async_.keys() and any(k.startswith("rng/") for k in sync)
        different = [k for k in sync if not _equal(sync[k], async_[k])]
        assert not different, f"{iteration}: {different}"
    assert (tmp_path / "async" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_sigkill_around_async_saves_then_resume_is_bit_identical(tmp_path):
    inputs = training_inputs()
    iters = 6
    run_distributed(4, train, train_flags(inputs, tmp_path / "full", iters=iters, extra=LAYOUT))  # synchronous

    killed_dir = tmp_path / "killed"
    flags = train_flags(inputs, killed_dir, iters=iters, extra=LAYOUT + ["--async-save"])
    killed = _torchrun(flags, "torch-adam", tmp_path / "killed.log")
    deadline = time.time() + 300
    # The second save's staging folder: the first is published by then (one save in flight at most).
    while not (killed_dir / ".iter_0000004.partial").exists() and not (killed_dir / "iter_0000004").exists():
        assert killed.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))  # writing in the background, publishing, or training on
    pids = kill_tree(killed.pid)
    killed.wait()
    assert len(pids) >= 5, pids
    saved = int((killed_dir / "latest_checkpointed_iteration.txt").read_text())
    assert saved in (2, 4), saved
    (killed_dir / "metrics.jsonl").rename(tmp_path / "killed_metrics.jsonl")

    resumed = train_flags(inputs, killed_dir, iters=iters, extra=LAYOUT + ["--async-save", "--load", str(killed_dir)])
    _finish(_torchrun(resumed, "torch-adam", tmp_path / "resumed.log"), tmp_path / "resumed.log", "resumed run")
    want, got = _values(tmp_path / "full" / "metrics.jsonl"), _values(killed_dir / "metrics.jsonl")
    assert sorted(got) == list(range(saved + 1, iters + 1))
    assert got == {i: want[i] for i in got}


def _fail_background_write_on_rank_1_at_4(ctx):
    """Rank 1's writer of the optimizer part raises at the save of iteration 4, in the background."""
    import threading

    import torch.distributed as dist

    from megatron_patch.training import checkpoint_parts

    original = checkpoint_parts.write_part

    def write_part(rank_dir, *args):
        if dist.get_rank() == 1 and "iter_0000004" in str(rank_dir):
            assert threading.current_thread() is not threading.main_thread()
            raise OSError(28, "No space left on device")
        return original(rank_dir, *args)

    checkpoint_parts.write_part = write_part
    return lambda: setattr(checkpoint_parts, "write_part", original)


def test_a_failed_background_write_stops_every_rank_in_one_line_with_the_previous_checkpoint_intact(tmp_path):
    inputs = training_inputs()
    run = tmp_path / "run"
    flags = train_flags(inputs, run, iters=6, extra=LAYOUT + ["--async-save"])
    with pytest.raises(DistributedError) as caught:
        run_distributed(2, train, flags, _fail_background_write_on_rank_1_at_4)
    message = str(caught.value)
    assert message.count("CheckpointError") >= 2  # every rank stops
    line = next(l for l in message.splitlines() if "CheckpointError:" in l)
    assert "rank 1 failed to write" in line and "No space left on device" in line, line
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (run / "iter_0000004").exists() and (run / "iter_0000002" / "train_state.json").is_file()
