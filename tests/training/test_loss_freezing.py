"""One loss definition at every split and layout; freezing; finetune in bf16; NaN steps; kills during a save."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch.data.sampler import GlobalOrder
from megatron_patch.data.shards import ShardedDataset
from tests.checkpoint.cli import mcore2hf
from tests.distributed_harness import DistributedError, run_distributed
from tests.training.fixtures import REPO, train_flags, training_inputs
from tests.training.runs import by_iteration, model_weights, train, validation

pytestmark = pytest.mark.e2e


SGD_STEP = ["--optimizer", "sgd", "--sgd-momentum", "0", "--weight-decay", "0", "--clip-grad", "0",
            "--lr", "1.0", "--min-lr", "1.0", "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
            "--answer-loss-only"]


def _one_sgd_step(tmp_path, name, world, mbs, extra=()):
    flags = train_flags(training_inputs(), tmp_path / name, iters=1, mbs=mbs, gbs=4, extra=SGD_STEP + list(extra))
    weights = run_distributed(world, model_weights, flags)[0]
    return by_iteration(tmp_path / name / "metrics.jsonl")[1]["lm_loss"], weights


def test_loss_and_gradients_do_not_depend_on_the_micro_batch_or_dp_split(tmp_path):
    # One SGD step of lr 1 from the same weights: new weights = old - gradient, so equal weights
    # after it mean equal gradients. Answer-only labels: token counts differ a lot between samples.
    ref_loss, ref = _one_sgd_step(tmp_path, "mbs4", 1, mbs=4)
    for name, world, mbs in (("mbs1x4", 1, 1), ("mbs1x2-dp2", 2, 1)):
        loss, weights = _one_sgd_step(tmp_path, name, world, mbs)
        assert loss == pytest.approx(ref_loss, rel=1e-6), name
        for key, tensor in ref.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert math.isfinite(ref_loss)


def test_five_steps_match_at_tp2_pp2_dp2_and_tp1_pp1_dp1(tmp_path):
    inputs = training_inputs()
    run_distributed(1, train, train_flags(inputs, tmp_path / "single", iters=5, extra=["--answer-loss-only"]))
    run_distributed(8, train, train_flags(inputs, tmp_path / "3d", iters=5, tp=2, pp=2,
                                          extra=["--answer-loss-only", "--use-distributed-optimizer"]))
    want, got = by_iteration(tmp_path / "single" / "metrics.jsonl"), by_iteration(tmp_path / "3d" / "metrics.jsonl")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for i in want:
        assert got[i]["lm_loss"] == pytest.approx(want[i]["lm_loss"], rel=1e-5), i
        assert got[i]["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-4), i
    assert want[5]["lm_loss"] < want[1]["lm_loss"]


FREEZE_FLAGS = {"llm": "--freeze-llm", "vision": "--freeze-clip-vision-tower", "connector": "--freeze-perceiver"}


def _component(hf_name: str) -> str:
    if hf_name.startswith("model.vision_model."):
        return "vision"
    if hf_name.startswith("model.connector."):
        return "connector"
    return "llm"


def _text_only(inputs, positions) -> list:
    """Which sampler positions (seed 7) hold a sample without an image."""
    data = ShardedDataset(str(inputs["train"]))
    _, idx = GlobalOrder([len(data)], None, 7, True).lookup(list(positions))
    return [not data.read(int(i)).images for i in idx]


ALL_SUBSETS = [tuple(sorted(s)) for s in (
    (), ("llm",), ("vision",), ("connector",), ("llm", "vision"), ("llm", "connector"), ("vision", "connector"))]


@pytest.mark.parametrize("frozen", ALL_SUBSETS, ids=lambda f: "+".join(f) or "none")
def test_freezing_with_text_only_micro_batches_and_overlapped_grad_reduce(tmp_path, frozen):
    inputs = training_inputs()
    # mbs 1 x 2 micro-batches x DP 2: the last micro-batch of an iteration (where DDP checks that
    # every bucket got its gradients) is at positions 2, 3 (iteration 1) and 6, 7 (iteration 2).
    assert any(_text_only(inputs, [2, 3, 6, 7]))
    extra = ["--pipeline-model-parallel-size", "2", "--overlap-grad-reduce", "--use-distributed-optimizer",
             *[FREEZE_FLAGS[c] for c in frozen]]
    run_distributed(4, train, train_flags(inputs, tmp_path / "run", iters=2, extra=extra))
    assert mcore2hf(tmp_path / "run", tmp_path / "hf") in (None, 0)
    before = load_file(str(inputs["hf"] / "model.safetensors"))
    after = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        after.update(load_file(str(f)))
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        same = torch.equal(after[name], tensor)
        assert same == (_component(name) in frozen), f"{name} ({_component(name)}) {'unchanged' if same else 'changed'}"


def test_finetune_from_release_in_bf16_starts_from_the_loaded_weights(tmp_path):
    inputs = training_inputs()
    # A trained model, so that its loss is far from any random init's; promoted to `release`.
    trained = tmp_path / "trained"
    run_distributed(1, train, train_flags(inputs, trained, iters=12, mbs=4, gbs=4,
                                          extra=["--answer-loss-only", "--lr", "3e-3"]))
    release = tmp_path / "release_ckpt"
    (release).mkdir()
    os.rename(trained / "iter_0000012", release / "release")
    (release / "latest_checkpointed_iteration.txt").write_text("release\n")
    # The loaded model's loss on the whole training set, evaluated in bf16 ...
    data = str(inputs["train"])
    eval_flags = train_flags(inputs, tmp_path / "eval", mbs=4, gbs=4, extra=["--bf16", "--answer-loss-only"])
    eval_flags[eval_flags.index("--load") + 1] = str(release)
    run_distributed(1, train, eval_flags + ["--skip-train", "--valid-data-path", data])
    reference = validation(tmp_path / "eval" / "metrics.jsonl")[-1]["validation_loss"]
    # ... equals the first finetuning iteration's, which covers the same 48 samples (gbs 48).
    flags = train_flags(inputs, tmp_path / "ft", iters=2, mbs=4, gbs=48,
                        extra=["--bf16", "--answer-loss-only", "--finetune", "--lr", "1e-6", "--min-lr", "0", "--lr-warmup-iters", "0"])
    flags[flags.index("--load") + 1] = str(release)
    run_distributed(1, train, flags)
    got = by_iteration(tmp_path / "ft" / "metrics.jsonl")
    first_loss = by_iteration(trained / "metrics.jsonl")[1]["lm_loss"]
    assert reference < 0.7 * first_loss  # trained: far below the random init's loss
    assert got[1]["lm_loss"] == pytest.approx(reference, rel=2e-2)
    # Main weights came from the loaded model: after a tiny step the loss is still the trained one.
    assert got[2]["lm_loss"] == pytest.approx(reference, rel=2e-2)


def _poison(iteration: int, until: int | None, ctx):
    """Runs on each rank (runs.train's patch): NaN losses during iterations [iteration, until]."""
    from megatron_patch.training import loss as loss_lib

    original = loss_lib.masked_loss_sum

    def poisoned(per_token_loss, loss_mask):
        step = ctx.state.iteration + 1
        if step >= iteration and (until is None or step <= until):
            per_token_loss = per_token_loss * float("nan")
        return original(per_token_loss, loss_mask)

    loss_lib.masked_loss_sum = poisoned
    return lambda: setattr(loss_lib, "masked_loss_sum", original)  # pool workers live on: undo


def _nan_from(iteration: int, until: int | None = None):
    return functools.partial(_poison, iteration, until)


def test_nan_step_is_skipped_and_counted(tmp_path):
    inputs = training_inputs()
    flags = train_flags(inputs, tmp_path / "run", iters=4, extra=["--pipeline-model-parallel-size", "2", "--save-interval", "1"])
    run_distributed(2, train, flags, patch=_nan_from(2, 2))
    records = by_iteration(tmp_path / "run" / "metrics.jsonl")
    assert math.isnan(records[2]["lm_loss"]) and records[2]["nan_iterations"] == 1
    assert records[2]["skipped_iterations"] == 1 and records[4]["nan_iterations"] == 1
    assert all(math.isfinite(records[i]["lm_loss"]) for i in (1, 3, 4))
    for rank_dir in ("mp_rank_00_000", "mp_rank_00_001"):  # the skipped step changed no weight
        one = load_file(str(tmp_path / "run" / "iter_0000001" / rank_dir / "model-00001.safetensors"))
        two = load_file(str(tmp_path / "run" / "iter_0000002" / rank_dir / "model-00001.safetensors"))
        assert all(torch.equal(one[k], two[k]) for k in one)


def test_too_many_nan_steps_stop_training_with_checkpoint_intact(tmp_path):
    inputs = training_inputs()
    flags = train_flags(inputs, tmp_path / "run", iters=6,
                        extra=["--pipeline-model-parallel-size", "2", "--save-interval", "1", "--max-skipped-iterations", "2"])
    with pytest.raises(DistributedError, match="2 consecutive iterations had NaN/Inf"):
        run_distributed(2, train, flags, patch=_nan_from(2))
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    run_distributed(2, train, train_flags(inputs, tmp_path / "run", iters=3, extra=[
        "--pipeline-model-parallel-size", "2", "--load", str(tmp_path / "run"), "--lr-decay-iters", "6"]))


KILL_DURING_SAVE = """
import os, signal, sys
from megatron_patch.checkpoint import commit as protocol, layout, safetensors_io
where = sys.argv[1]
original_write, original_commit = safetensors_io.write_safetensors, protocol.commit
def write(path, tensors, metadata=None):
    if "iter_0000002" in str(path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return original_write(path, tensors, metadata)
def commit(staging, final, replace=False):
    if final.name == "iter_0000002":
        os.kill(os.getpid(), signal.SIGKILL)
    return original_commit(staging, final, replace)
if where == "write":
    from megatron_patch.checkpoint import model_files
    model_files.write_safetensors = write
else:
    protocol.commit = commit
from tests.training.runs import train
train(sys.argv[2:])
"""


@pytest.mark.parametrize("where", ["write", "rename"])
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, where):
    inputs = training_inputs()
    save = tmp_path / "run"
    flags = train_flags(inputs, save, iters=3, extra=["--save-interval", "1", "--lr-decay-iters", "3"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, where, *flags], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not (save / "iter_0000002").exists()
    run_distributed(1, train, train_flags(inputs, save, iters=3, extra=["--load", str(save), "--lr-decay-iters", "3"]))
    assert sorted(by_iteration(save / "metrics.jsonl")) == [1, 2, 3]
