"""The distributed test harness: per-rank results, failures with tracebacks, no hangs, pool reuse."""
from __future__ import annotations

import os

import pytest

from tests.distributed_harness import DistributedError, pool_pids, run_distributed

pytestmark = pytest.mark.distributed


def _rank_report(tp: int, pp: int, scale: float = 1.0):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch.platform import init_distributed

    init_distributed(tp, pp)
    value = torch.tensor([float(dist.get_rank()) * scale])
    dist.all_reduce(value)
    return {
        "rank": dist.get_rank(),
        "pid": os.getpid(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "sum": value.item(),
    }


def _fail_then_block(bad_rank: int):
    import torch.distributed as dist

    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure on rank {bad_rank}")
    dist.barrier()  # never completes: bad_rank does not come
    return "unreachable"


def _slow_rank(slow_rank: int, seconds: float):
    import time

    import torch.distributed as dist

    if dist.get_rank() == slow_rank:
        time.sleep(seconds)
    dist.barrier()


def _exit_abruptly(rank: int):
    import torch.distributed as dist

    if dist.get_rank() == rank:
        os._exit(3)  # no traceback, no reply: like a segfault or the OOM killer
    dist.barrier()


def _raise_everywhere():
    import torch.distributed as dist

    raise KeyError(f"everyone fails, this is rank {dist.get_rank()}")


def test_results_come_back_per_rank_and_pool_is_reused():
    first = run_distributed(4, _rank_report, 2, 2)
    assert [r["rank"] for r in first] == [0, 1, 2, 3]
    assert all(r["sum"] == 6.0 for r in first)
    assert [(r["pp_rank"], r["tp_rank"]) for r in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Another layout on the same world: same processes, model-parallel state rebuilt.
    second = run_distributed(4, _rank_report, 1, 4, scale=2.0)
    assert [r["pid"] for r in second] == [r["pid"] for r in first] == pool_pids(4)
    assert [r["pp_rank"] for r in second] == [0, 1, 2, 3] and second[0]["sum"] == 12.0


def test_failing_rank_traceback_surfaces_and_blocked_ranks_do_not_hang():
    before = run_distributed(2, _rank_report, 1, 1)
    with pytest.raises(DistributedError) as info:
        run_distributed(2, _fail_then_block, 1, timeout=60)
    message = str(info.value)
    assert "--- rank 1 raised:" in message and "Traceback" in message
    assert "deliberate failure on rank 1" in message and "_fail_then_block" in message
    assert "ranks [0] had not finished" in message
    assert pool_pids(2) is None  # killed
    after = run_distributed(2, _rank_report, 2, 1)  # a fresh pool serves the next job
    assert {r["pid"] for r in after}.isdisjoint(r["pid"] for r in before)
    assert [r["tp_rank"] for r in after] == [0, 1]


def test_every_failing_rank_is_reported():
    with pytest.raises(DistributedError) as info:
        run_distributed(2, _raise_everywhere)
    message = str(info.value)
    assert "this is rank 0" in message and "this is rank 1" in message


def test_timeout_without_any_failure_is_reported():
    with pytest.raises(DistributedError, match="timed out after 2s"):
        run_distributed(2, _slow_rank, 1, 600, timeout=2)


def test_a_rank_dying_without_a_traceback_is_reported():
    with pytest.raises(DistributedError, match=r"(?s)rank 0 raised:\nprocess died \(exit code 3\)"):
        run_distributed(2, _exit_abruptly, 0, timeout=60)


def test_unpicklable_function_is_refused_before_any_rank_runs():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(2, lambda: None)
