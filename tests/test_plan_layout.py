"""The layout planner (toolkits/plan_layout.py): counts from the real model built on meta, state bytes
equal to what a built model holds, an activation estimate close to a measured step, a usable CLI."""
from __future__ import annotations

import json

import pytest

from tests import planning_cases as cases
from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.distributed


LAYOUTS = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4)]


@pytest.mark.parametrize("config_name", ["idefics2-8b", "idefics2-llama3-8b"])
def test_parameters_counted_once_sum_to_the_hf_count(config_name):
    # Every part built on meta at every layout; replicated tensors (norms, biases, the perceiver's KV
    # copies at TP above its KV heads), the tied head's copy and vocabulary padding counted once.
    counts = run_distributed(1, cases.counted_params_case, config_name, LAYOUTS)[0]
    hf = counts.pop("hf")
    assert hf > 8e9
    accepted = {k: v for k, v in counts.items() if not isinstance(v, str)}
    assert (4, 2) in accepted and (1, 1) in accepted, counts
    for layout, value in counts.items():
        if isinstance(value, str):  # refused: one line naming the flag
            assert "\n" not in value and "--" in value, (layout, value)
        else:
            assert value == hf, (layout, value - hf)


STATE_CASES = {
    "tp2-dp2-distributed-fp32": (2, 1, True, False, ()),
    "pp2-dp2-distributed-bf16-frozen-vision": (1, 2, True, True, ("vision",)),
    "tp2-pp2-plain-bf16": (2, 2, False, True, ()),
    "pp2-dp2-distributed-tied-head": (1, 2, True, False, (), "llama", True),
    "tp2-dp2-distributed-bf16-frozen-llm": (2, 1, True, True, ("llm",)),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_bytes_equal_what_a_built_model_holds(case):
    tp, pp, distributed, bf16, frozen, *text = STATE_CASES[case]
    extra = dict(text=text[0], tied=text[1]) if text else {}
    for rank, (held, planned) in enumerate(run_distributed(4, cases.state_bytes_case, tp, pp, distributed, bf16, frozen, **extra)):
        assert held == planned, (case, rank)


@pytest.mark.parametrize("config_name,seq,recompute,frozen", [
    ("tiny", 512, None, ()), ("tiny", 512, "full", ()), ("small", 256, None, ()), ("small", 256, "full", ()),
    ("small", 256, None, ("vision",)),
])
def test_activation_estimate_within_a_quarter_of_the_measured_step(config_name, seq, recompute, frozen):
    # "small": bench_train_step's model (SigLIP 256 x 4 at 224 px, perceiver 64 latents, LLM 512 x 4).
    measured, estimated = run_distributed(1, cases.activation_case, config_name, seq, recompute, frozen)[0]
    print(f"{config_name} seq {seq} recompute {recompute} frozen {frozen}: measured {measured:.2f} MiB, estimated {estimated:.2f} MiB "
          f"({estimated / measured:.2f}x)")
    assert measured > 0.5  # MiB: a real step was measured
    assert abs(estimated - measured) <= 0.25 * measured, (measured, estimated)


def test_cli_plans_a_written_reference_config(tmp_path):
    config = tmp_path / "idefics2-8b.json"
    code, out, err = run_distributed(1, cases.cli_case, ["--model", "idefics2-8b", "--write-config", str(config)])[0]
    assert code == 0 and config.is_file(), err
    assert json.loads(config.read_text())["text_config"]["vocab_size"] == 32003
    code, out, err = run_distributed(1, cases.cli_case, [
        "--model-config", str(config), "--gpus", "8", "--bf16", "--use-distributed-optimizer",
        "--recompute-granularity", "full", "--summary"])[0]
    assert code == 0, err
    assert "8,402,768,112 parameters" in out and "layouts that fit" in out
    assert "1. TP1 PP1 DP8" in out


@pytest.mark.parametrize("argv,flag", [
    (["--model", "idefics2-8b", "--gpus", "0"], "--gpus"),
    (["--model", "idefics2-8b"], "--gpus"),
    (["--model", "idefics2-8b", "--gpus", "8", "--seq-length", "-1"], "--seq-length"),
    (["--model-config", "/nonexistent/config.json", "--gpus", "8"], "/nonexistent/config.json"),
])
def test_cli_bad_flags_fail_in_one_line(argv, flag):
    code, out, err = run_distributed(1, cases.cli_case, argv)[0]
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("plan_layout: error:") and flag in err, err
