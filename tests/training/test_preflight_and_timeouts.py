"""Start-up and failure settings of issue 19: the torch.compile preflight (one line, then the unfused
path), --distributed-timeout-minutes (one-line timeouts), --overlap-param-gather's prerequisites and
gradient-accumulation fusion only where apex's kernels are."""
from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import io
import math

import pytest
import torch
import torch.distributed as dist

from megatron_patch.training.arguments import ArgumentError, build_parser, validate_args
from tests.distributed_harness import run_distributed
from tests.training.fixtures import REPO, train_flags, training_inputs

pytestmark = pytest.mark.distributed


FAILED_COMPILE = "C++ compile error\nCommand: g++ /tmp/torchinductor/x.cpp ...\nOutput: cc1plus: fatal error"


def _raising_fuser(fn):
    """A jit_fuser whose compiled functions fail at their first call, as Inductor's do."""
    def compiled(*args, **kwargs):
        raise RuntimeError(FAILED_COMPILE)
    return compiled


def _train_with_fusions_asked_for(flags: list, compile_fails: bool):
    """Train with bias fusions requested (as on CUDA): (what start-up printed about the preflight,
    the options' fusions, the fusions the built model's configs use, the last training record)."""
    import dataclasses

    from megatron.core import jit

    from megatron_patch.training import build
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import pretrain

    saved = jit.jit_fuser, build.parallel_options
    jit.jit_fuser = _raising_fuser if compile_fails else (lambda fn: fn)  # eager stands in for a working compile
    build.parallel_options = lambda args: dataclasses.replace(saved[1](args), bias_fusions=True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ctx = build.build_training(parse_args(flags))
    finally:
        jit.jit_fuser, build.parallel_options = saved
    record = pretrain(ctx)
    used = {m.config.bias_activation_fusion or m.config.bias_dropout_fusion
            for m in ctx.model.module.modules() if getattr(m, "config", None) is not None}
    return [line for line in printed.getvalue().splitlines() if "preflight" in line], ctx.opts.bias_fusions, used, record


def test_a_failing_compile_preflight_is_one_line_and_training_goes_on_unfused(tmp_path):
    inputs = training_inputs()
    flags = train_flags(inputs, tmp_path / "failing", iters=2, gbs=2)
    lines, fusions, used, record = run_distributed(1, _train_with_fusions_asked_for, flags, True)[0]
    assert len(lines) == 1, lines
    assert lines[0].startswith("[megatron_patch] torch.compile preflight failed (RuntimeError: C++ compile error)")
    assert "unfused path" in lines[0]
    assert fusions is False and used == {False}
    assert record["iteration"] == 2 and math.isfinite(record["lm_loss"])


def test_a_working_compile_keeps_the_fusions(monkeypatch, capsys):
    from megatron.core import jit

    from megatron_patch.models.idefics2.config import ParallelOptions
    from megatron_patch.platform.compile_preflight import fusion_preflight

    monkeypatch.setattr(jit, "jit_fuser", lambda fn: fn)  # eager stands in for a compile that works
    asked = ParallelOptions(bias_fusions=True)
    assert fusion_preflight(asked, torch.device("cpu")) is asked and capsys.readouterr().out == ""
    monkeypatch.setattr(jit, "jit_fuser", _raising_fuser)
    assert fusion_preflight(ParallelOptions(bias_fusions=False), torch.device("cpu")).bias_fusions is False  # not asked
    assert capsys.readouterr().out == ""  # ... so not checked


def _store_timeout() -> Exception:
    """A real one: a gloo group whose peer never joins, with a one-second timeout."""
    try:
        dist.ProcessGroupGloo(dist.HashStore(), 0, 2, datetime.timedelta(seconds=1))
    except Exception as err:
        return err
    raise AssertionError("the group was built without its peer")


# Seen from a gloo rank whose peer stopped taking part (2 ranks, a 3-second group timeout).
GLOO_RECV = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                         "3000ms for recv operation to complete")


def _entry_point():
    spec = importlib.util.spec_from_file_location("entry_point", REPO / "examples" / "idefics2" / "pretrain_megatron_idefics2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("error", [_store_timeout(), GLOO_RECV], ids=["store", "gloo_recv"])
def test_distributed_timeouts_end_in_one_line(error, tmp_path, monkeypatch, capsys):
    from megatron_patch.platform import distributed
    from megatron_patch.training import build

    def timed_out(args):
        raise error

    monkeypatch.setattr(build, "build_training", timed_out)
    monkeypatch.setattr(distributed, "_error_exit", False)
    flags = train_flags(training_inputs(), tmp_path / "run", extra=["--distributed-timeout-minutes", "7"])
    with pytest.raises(SystemExit) as exit_:
        _entry_point().main(flags)
    assert exit_.value.code == 1 and distributed._error_exit  # the groups are aborted at exit
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain_megatron_idefics2: error: a collective or the rendezvous "
                                                   "timed out after --distributed-timeout-minutes 7"), lines


def test_other_errors_are_not_called_timeouts():
    from megatron_patch.training.errors import as_collective_timeout

    assert as_collective_timeout(RuntimeError("CUDA out of memory"), 10) is None
    assert as_collective_timeout(RuntimeError("DataLoader timed out after 30 seconds"), 10) is None
    assert as_collective_timeout(ValueError("gloo timeout"), 10) is None


def _validated(tmp_path, *extra):
    args = build_parser().parse_args(train_flags(training_inputs(), tmp_path / "run", extra=list(extra)))
    validate_args(args, 2)
    return args


@pytest.mark.parametrize("extra, words", [
    (["--overlap-param-gather", "--overlap-grad-reduce"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather needs --overlap-grad-reduce"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be >= 1, got 0"),
])
def test_settings_refused_in_one_line(tmp_path, extra, words):
    with pytest.raises(ArgumentError, match=words) as err:
        _validated(tmp_path, *extra)
    assert "\n" not in str(err.value)


def test_defaults_and_gradient_accumulation_fusion_only_with_apex(tmp_path, monkeypatch):
    from megatron_patch.models.idefics2 import config
    from megatron_patch.training.arguments import parallel_options

    accelerators = importlib.import_module("megatron_patch.platform.accelerators")  # the module, not the function

    args = _validated(tmp_path, "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather")
    assert args.distributed_timeout_minutes == 10 and args.overlap_param_gather  # Megatron-LM's default
    auto = parallel_options(args)
    off = parallel_options(_validated(tmp_path, "--no-gradient-accumulation-fusion"))
    assert (auto.gradient_accumulation_fusion, off.gradient_accumulation_fusion) == (None, False)
    for cuda, apex, want_auto in ((False, False, False), (True, False, False), (True, True, True)):
        monkeypatch.setattr(config.torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(accelerators, "accelerators", lambda: {"fused_weight_gradient_mlp_cuda": apex})
        assert config.grad_accumulation_fusion_on(auto) is want_auto, (cuda, apex)
        assert config.grad_accumulation_fusion_on(off) is False
        assert ("gradient accumulation on" in config.describe_fusions(auto)) is want_auto
    assert config.describe_fusions(off).endswith("gradient accumulation off (--no-gradient-accumulation-fusion)")
