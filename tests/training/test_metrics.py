"""MetricsWriter sinks (JSONL, stdout, tensorboard), reading back, the log lines, progress()."""
from __future__ import annotations

import glob
import json

import pytest

from megatron_patch.training import metrics
from megatron_patch.training.metrics import (
    TRAINING_KEYS, VALIDATION_KEYS, MetricsFileError, MetricsWriter, read_metrics,
)

pytestmark = pytest.mark.unit


def training_record(iteration: int, loss: float = 3.456789, mfu=None) -> dict:
    values = dict(
        iteration=iteration, consumed_samples=8 * iteration, lm_loss=loss, grad_norm=1.2345, lr=1e-4,
        loss_scale=1.0, skipped_iterations=0, nan_iterations=0, bad_samples=0, tokens_per_second=1234.5,
        tflops_per_device=1.234, mfu=mfu, elapsed_ms_per_iteration=812.25, time_left_seconds=3725.4,
    )
    assert tuple(values) == TRAINING_KEYS
    return values


def validation_record(iteration: int) -> dict:
    values = dict(iteration=iteration, validation_loss=3.2, validation_ppl=24.5325, validation_tokens=640)
    assert tuple(values) == VALIDATION_KEYS
    return values


def test_jsonl_written_and_read_back(tmp_path, capsys):
    path = tmp_path / "run" / "metrics.jsonl"  # parent folder does not exist yet
    records = [training_record(1), training_record(2, mfu=0.4), validation_record(2)]
    with MetricsWriter(str(path), None, enabled=True, train_iters=100) as writer:
        for r in records:
            writer.write(r)
        writer.write({"iteration": 3, "note": "custom"}, line="custom line")
    assert read_metrics(str(path)) == records + [{"iteration": 3, "note": "custom"}]
    assert [json.loads(line) for line in path.read_text().splitlines()][:3] == records
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        " iteration        1/     100 | consumed samples:            8 | elapsed time per iteration (ms): 812.2"
        " | time left: 1:02:05 | lm loss: 3.456789E+00 | grad norm: 1.234"
        " | lr: 1.000000E-04 | loss scale: 1.0 | skipped: 0 | nan: 0 | bad samples: 0 | tokens/s: 1234.5"
        " | TFLOP/s/device: 1.23 | MFU: n/a |"
    )
    assert out[1].endswith("MFU: 40.0% |")
    assert out[2].startswith(" validation at iteration        2 | lm loss: 3.200000E+00 | lm loss PPL: 2.453250E+01")
    assert out[3] == "custom line"


def test_appends_across_writers(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    for i in (1, 2):  # a resumed run opens the same file again
        with MetricsWriter(path, None, enabled=True) as writer:
            writer.write(training_record(i))
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2]


def test_truncated_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(training_record(1)) + "\n" + json.dumps(training_record(2))[:25])
    assert read_metrics(str(path)) == [training_record(1)]


def test_corruption_before_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(training_record(1)) + "\n{not json\n" + json.dumps(training_record(3)) + "\n")
    with pytest.raises(MetricsFileError) as err:
        read_metrics(str(path))
    message = str(err.value)
    assert str(path) in message and "line 2" in message and "\n" not in message
    # A broken line that did end with its newline was written whole: corruption, not a kill.
    path.write_text(json.dumps(training_record(1)) + "\n{not json\n")
    with pytest.raises(MetricsFileError, match="line 2"):
        read_metrics(str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(MetricsFileError, match="expected a JSON object"):
        read_metrics(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(str(tmp_path / "missing.jsonl"))


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tb"
    with MetricsWriter(None, str(tb_dir), enabled=True) as writer:
        writer.write(training_record(5, loss=2.5))
        writer.write(training_record(6, loss=2.25))
        writer.write(validation_record(6))
    assert glob.glob(str(tb_dir / "events.out.tfevents.*"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm_loss", "grad_norm", "lr", "validation_loss", "consumed_samples"} <= tags
    assert "iteration" not in tags and "mfu" not in tags  # the step, and a None value
    assert [(e.step, e.value) for e in events.Scalars("lm_loss")] == [(5, 2.5), (6, 2.25)]
    assert [(e.step, e.value) for e in events.Scalars("validation_loss")] == [(6, pytest.approx(3.2))]


def test_disabled_writer_writes_nothing(tmp_path, capsys):
    path, tb_dir = tmp_path / "run" / "metrics.jsonl", tmp_path / "tb"
    writer = MetricsWriter(str(path), str(tb_dir), enabled=False)
    writer.write(training_record(1))
    writer.close()
    assert not path.exists() and not path.parent.exists() and not tb_dir.exists()
    assert capsys.readouterr().out == ""


def test_progress_prints_on_rank_zero_without_distributed(capsys):
    metrics.progress("building the model")
    assert capsys.readouterr().out == "[megatron_patch] building the model\n"


def test_peak_table_lookup():
    from megatron_patch.training.flops import peak_tflops

    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA L40") == 181.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert peak_tflops(None) is None
