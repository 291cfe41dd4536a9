"""--overlap-param-gather: the distributed optimizer's parameter all-gather deferred to the next
forward (megatron-core's forward pre-hooks), over several buckets, trains exactly like the gather
right after the step: the same losses, grad norms, validation losses and saved weights."""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import by_iteration, validation

pytestmark = pytest.mark.distributed


BUCKET_ELEMENTS = 40_000  # several DDP buckets even for the tiny model, so the gather goes bucket by bucket


def _train_in_small_buckets(flags: list):
    """Train with `flags` in small DDP buckets; (bucket groups, whether DDP defers the gather to forward
    pre-hooks) on rank 0."""
    from megatron_patch.training import optimizer
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.loop import pretrain

    original = optimizer.DistributedDataParallelConfig
    optimizer.DistributedDataParallelConfig = functools.partial(original, bucket_size=BUCKET_ELEMENTS)
    try:
        ctx = build_training(parse_args(flags))
    finally:
        optimizer.DistributedDataParallelConfig = original
    pretrain(ctx)  # saves iteration 3 at the end, then evaluates it
    return len(ctx.model.bucket_groups), ctx.model.use_forward_hook


def _saved(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("iter_0000003/mp_rank_*/*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    return out


def test_overlapped_param_gather_trains_like_the_gather_after_the_step(tmp_path):
    inputs = training_inputs()
    common = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--valid-data-path", str(inputs["valid"]),
              "--eval-interval", "2", "--eval-iters", "1"]
    runs = {}
    for name, extra in (("after_step", []), ("overlapped", ["--overlap-param-gather"])):
        flags = train_flags(inputs, tmp_path / name, iters=3, gbs=2, extra=common + extra)
        runs[name] = run_distributed(2, _train_in_small_buckets, flags)[0]  # DP 2: each rank steps half
    assert runs["after_step"][0] == runs["overlapped"][0] >= 3, runs
    assert runs["overlapped"][1] and not runs["after_step"][1]  # the flag reached megatron-core's DDP
    a, b = by_iteration(tmp_path / "after_step" / "metrics.jsonl"), by_iteration(tmp_path / "overlapped" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for i in a:
        assert b[i]["lm_loss"] == pytest.approx(a[i]["lm_loss"], rel=1e-6, abs=0), i
        assert b[i]["grad_norm"] == pytest.approx(a[i]["grad_norm"], rel=1e-6, abs=0), i
    assert a[3]["lm_loss"] != a[1]["lm_loss"]  # the weights did change between iterations
    va, vb = validation(tmp_path / "after_step" / "metrics.jsonl"), validation(tmp_path / "overlapped" / "metrics.jsonl")
    assert len(va) == 2 and [v["validation_loss"] for v in vb] == pytest.approx([v["validation_loss"] for v in va], rel=1e-6)
    want, got = _saved(tmp_path / "after_step"), _saved(tmp_path / "overlapped")
    assert sorted(got) == sorted(want) and any(k.startswith("model") for k in want)
    for name, tensor in want.items():  # the final save wrote the gathered, updated weights
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=0, msg=name)
