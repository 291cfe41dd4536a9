"""LoRA checkpoints: the adapters alone (no copy of the frozen base) with the optimizer, schedule, RNG and
data state; the base they train recorded and checked on resume; a run killed by SIGKILL resumes bit
for bit (with adapter dropout: the RNG states matter), and a run saved at one layout resumes at another
with its adapters' optimizer state and the same next losses (the modules trained fully beside the adapters too)."""
from __future__ import annotations

import json
import random
import re
import shutil
import time

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.process_tree import kill_tree
from tests.training.runs import by_iteration, loaded_optimizer_state, saved_optimizer_state, train
from tests.training.test_resume import KEYS, _finish, _torchrun, _values

pytestmark = pytest.mark.e2e

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"]
PP2_DP2 = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save-interval", "2"]


def _tensor_names(iteration_dir) -> list:
    from megatron_patch.checkpoint.model_files import RankReader

    return [name for rank_dir in sorted(iteration_dir.glob("mp_rank_*")) for name in RankReader(rank_dir).names()]


def test_sigkill_lora_run_then_resume_is_bit_identical(tmp_path):
    inputs = training_inputs()  # --load: the tiny base, a release checkpoint
    iters = 6
    run_distributed(4, train, train_flags(inputs, tmp_path / "full", iters=iters, extra=PP2_DP2 + LORA))

    killed_dir = tmp_path / "killed"
    killed = _torchrun(train_flags(inputs, killed_dir, iters=iters, extra=PP2_DP2 + LORA), "torch-adam",
                       tmp_path / "killed.log")
    deadline = time.time() + 300
    while not (killed_dir / "iter_0000002").is_dir():
        assert killed.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    pids = kill_tree(killed.pid)
    killed.wait()
    assert len(pids) >= 5, pids
    saved = int((killed_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < iters, f"the run had checkpointed iteration {saved} of {iters}: nothing left to resume"
    (killed_dir / "metrics.jsonl").rename(tmp_path / "killed_metrics.jsonl")

    folder = killed_dir / f"iter_{saved:07d}"
    names = _tensor_names(folder)
    assert names and all(".lora_" in n for n in names), names  # adapters only: no copy of the base
    info = json.loads((folder / "checkpoint_info.json").read_text())
    assert info["lora"]["rank"] == 4 and info["lora"]["base"]["path"] == str(inputs["mg"].resolve())

    # Resumed with --load alone: rank, alpha and dropout come from the checkpoint, the base from its record.
    resumed = train_flags(inputs, killed_dir, iters=iters, extra=PP2_DP2 + ["--load", str(killed_dir)])
    out = _finish(_torchrun(resumed, "torch-adam", tmp_path / "resumed.log"), tmp_path / "resumed.log", "resumed run")
    assert re.search(rf"resumed \S*iter_{saved:07d}: iteration {saved},", out), out[-3000:]
    assert f"loading weights from {inputs['mg'].resolve()}" in out
    want, got = _values(tmp_path / "full" / "metrics.jsonl"), _values(killed_dir / "metrics.jsonl")
    assert sorted(got) == list(range(saved + 1, iters + 1))
    assert got == {i: want[i] for i in got}


@pytest.fixture(scope="module")
def lora_saved_at_1_2_2(tmp_path_factory):
    """4 LoRA iterations at TP1 x PP2 x DP2 (distributed optimizer, Adam), the modality projection
    trained fully beside the adapters, saved at 2 and 4."""
    root = tmp_path_factory.mktemp("lora_layouts")
    inputs = training_inputs()
    extra = PP2_DP2 + LORA[:4] + ["--lora-modules-to-save", "modality_projection"]
    run_distributed(4, train, train_flags(inputs, root / "run", iters=4, extra=extra))
    return inputs, root


def test_lora_resume_at_another_layout_keeps_adapter_optimizer_state(lora_saved_at_1_2_2, tmp_path):
    inputs, root = lora_saved_at_1_2_2
    saved = saved_optimizer_state(root / "run" / "iter_0000002", KEYS)
    assert saved["param"] and all(".lora_" in name or ".modality_projection." in name for name in saved["param"])
    assert any(".modality_projection." in name for name in saved["param"])  # what trains, nothing frozen
    flags = train_flags(inputs, tmp_path / "resumed", iters=4,
                        extra=["--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
                               "--load", str(root / "run"), "--iteration", "2"])
    loaded = run_distributed(4, loaded_optimizer_state, flags)[0]
    for key in KEYS:
        assert sorted(loaded[key]) == sorted(saved[key])
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), (key, name)
    assert any(float(t.abs().sum()) > 0 for n, t in saved["exp_avg_sq"].items() if "lora_B" in n)
    assert any(float(t.abs().sum()) > 0 for n, t in saved["exp_avg_sq"].items() if "gate_proj.weight" in n)

    run_distributed(4, train, flags)
    want, got = by_iteration(root / "run" / "metrics.jsonl"), by_iteration(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(got) == [3, 4]
    for i in (3, 4):
        assert got[i]["lm_loss"] == pytest.approx(want[i]["lm_loss"], rel=1e-5)
        assert got[i]["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-4)


def _validate(flags):
    from megatron_patch.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(flags)
    validate_args(args, 1)
    return args


def test_lora_checkpoint_base_is_checked(lora_saved_at_1_2_2, tmp_path):
    from megatron_patch.training.arguments import ArgumentError

    inputs, root = lora_saved_at_1_2_2
    base = tmp_path / "base"
    shutil.copytree(inputs["mg"], base)
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    info_path = run / "iter_0000004" / "checkpoint_info.json"
    info = json.loads(info_path.read_text())
    info["lora"]["base"]["path"] = str(base)
    info_path.write_text(json.dumps(info))
    flags = train_flags(inputs, tmp_path / "unused", extra=["--load", str(run)])

    args = _validate(flags)
    assert args.lora.rank == 4 and args.load_adapters and args.base_load == str(base)
    assert args.lora_record["base"]["fingerprint"] == info["lora"]["base"]["fingerprint"]

    checks = []
    moved = tmp_path / "moved"
    base.rename(moved)
    checks.append((flags, "is missing"))
    assert _validate(flags + ["--lora-base", str(moved)]).base_load == str(moved)  # a moved base, named
    weights = sorted(moved.glob("release/mp_rank_*/*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # another base: its weights differ
    weights.write_bytes(bytes(data))
    checks.append((flags + ["--lora-base", str(moved)], "differs from the base"))
    checks.append((flags + ["--lora-rank", "8"], "--lora-rank 8 disagrees with --load"))
    for bad, expected in checks:
        with pytest.raises(ArgumentError) as err:
            _validate(bad)
        assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)
