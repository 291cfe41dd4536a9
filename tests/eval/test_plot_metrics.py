"""toolkits/eval/plot_metrics.py: a PNG from a metrics JSONL; one-line errors with exit status 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from toolkits.eval import plot_metrics

pytestmark = pytest.mark.unit


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "toolkits", "eval", "plot_metrics.py")


def write_metrics(path, with_validation=True, with_training=True):
    lines = []
    for i in range(1, 11):
        if with_training:
            lines.append(dict(iteration=i, consumed_samples=8 * i, lm_loss=4.0 / i, grad_norm=1.0 + 0.1 * i,
                              lr=1e-4 * min(1.0, i / 3), loss_scale=1.0, skipped_iterations=0, nan_iterations=0,
                              bad_samples=0, tokens_per_second=100.0, tflops_per_device=0.01, mfu=None))
        if with_validation and i % 5 == 0:
            lines.append(dict(iteration=i, validation_loss=4.5 / i, validation_ppl=2.0, validation_tokens=64))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_png_written_next_to_input(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics)
    assert plot_metrics.main([str(metrics)]) == 0
    png = tmp_path / "loss.png"
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 400 <= width <= 2000 and 400 <= height <= 2000


def test_output_flag_and_training_only(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, with_validation=False)
    out = tmp_path / "figures" / "run.png"
    assert plot_metrics.main([str(metrics), "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size[0] > 100


def test_no_training_records_is_one_line_error(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, with_training=False)
    assert plot_metrics.main([str(metrics)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics: error: ") and "no training records" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "loss.png").exists()


def test_missing_file_exits_1_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path / "missing.jsonl")], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.startswith("plot_metrics: error: ") and "does not exist" in done.stderr
    assert done.stderr.count("\n") == 1
