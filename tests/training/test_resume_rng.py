"""RNG states on a same-layout resume: with attention dropout on, a run resumed from its checkpoint
logs the uninterrupted run's losses bit for bit, and right after the load every RNG of every rank
(python, numpy, torch, megatron-core's model-parallel tracker) is the one the run saved."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import by_iteration

pytestmark = pytest.mark.distributed


DROPOUT = 0.2
LAYOUT = ["--tensor-model-parallel-size", "2", "--save-interval", "2", "--lr-decay-iters", "3"]


def _dropout_checkpoint(inputs, root):
    """The tiny release checkpoint with attention dropout in its text model and perceiver."""
    folder = root / "mg_dropout"
    shutil.copytree(inputs["mg"], folder)
    config_path = folder / "release" / "hf_config" / "config.json"
    config = json.loads(config_path.read_text())
    for tower in ("text_config", "perceiver_config"):
        config[tower]["attention_dropout"] = DROPOUT
    config_path.write_text(json.dumps(config))
    return folder


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _differing_rngs(a: dict, b: dict) -> list:
    """Names of the RNGs whose states differ (empty when all equal)."""
    differ = [k for k in ("torch", "cuda") if k in a and not torch.equal(a[k], b[k])]
    if a["python"][:2] != b["python"][:2]:
        differ.append("python")
    if a["numpy"][0] != b["numpy"][0] or not np.array_equal(a["numpy"][1], b["numpy"][1]) \
            or a["numpy"][2:] != b["numpy"][2:]:
        differ.append("numpy")
    if sorted(a["tracker"]) != sorted(b["tracker"]) or \
            any(not torch.equal(a["tracker"][k], b["tracker"][k]) for k in a["tracker"]):
        differ.append("tracker")
    return differ


def _losses(run) -> dict:
    return {i: (r["lm_loss"], r["grad_norm"]) for i, r in by_iteration(run / "metrics.jsonl").items()}


def _train_reporting_rng(flags: list):
    """This rank's RNG states (after building the run, after training); a run from iteration 0
    first draws from every global RNG, as augmentations would, so no saved state is the seed's."""
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.loop import pretrain

    ctx = build_training(parse_args(flags))
    after_build = _rng_states()
    if ctx.state.iteration == 0:
        random.random(), np.random.random(), torch.rand(1)
    pretrain(ctx)
    return after_build, _rng_states()


def test_resume_with_attention_dropout_restores_every_rng_and_is_bit_identical(tmp_path):
    inputs = training_inputs()
    ckpt = _dropout_checkpoint(inputs, tmp_path)

    def flags(save, iters, load=ckpt):
        out = train_flags(inputs, tmp_path / save, iters=iters, extra=LAYOUT)
        out[out.index("--load") + 1] = str(load)
        return out

    full = run_distributed(2, _train_reporting_rng, flags("full", 3))
    part = run_distributed(2, _train_reporting_rng, flags("part", 2))
    resumed = run_distributed(2, _train_reporting_rng, flags("part", 3, load=tmp_path / "part"))
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(got) == [1, 2, 3] and got == want  # bit-identical lm_loss and grad_norm

    for rank, ((_, saved), (loaded, _)) in enumerate(zip(part, resumed)):
        assert _differing_rngs(saved, loaded) == [], f"rank {rank}: RNG states differ from the saved ones after the load"
    # The states were worth checking: training moved them away from a fresh start's.
    assert "tracker" in _differing_rngs(full[0][0], part[0][1]) and "python" in _differing_rngs(full[0][0], part[0][1])
    # The TP ranks drop from streams of their own.
    assert "tracker" in _differing_rngs(part[0][1], part[1][1])
