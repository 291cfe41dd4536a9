"""Plot a training run's metrics JSONL: loss (training + validation), learning rate, grad norm.

Example::

    python toolkits/eval/plot_metrics.py /runs/tiny/metrics.jsonl            # -> /runs/tiny/loss.png
    python toolkits/eval/plot_metrics.py metrics.jsonl --output figures/run1.png

A resumed run appends to the same file and may redo iterations; the last record of an iteration wins.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from megatron_patch.training.metrics import MetricsFileError, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of the records holding `key`, last record per iteration, in order."""
    latest = {int(r["iteration"]): r[key] for r in records if key in r and "iteration" in r}
    steps = sorted(latest)
    return steps, [math.nan if latest[s] is None else float(latest[s]) for s in steps]


def plot(records: list[dict], output: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax, grad_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_ax.plot(*_series(records, "lm_loss"), label="training loss")
    val_steps, val_loss = _series(records, "validation_loss")
    if val_steps:
        loss_ax.plot(val_steps, val_loss, "o-", label="validation loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    lr_ax.plot(*_series(records, "lr"), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    grad_ax.plot(*_series(records, "grad_norm"), color="tab:red")
    grad_ax.set_ylabel("grad norm")
    grad_ax.set_xlabel("iteration")
    for ax in (loss_ax, lr_ax, grad_ax):
        ax.grid(alpha=0.3)
    if title:
        loss_ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plot_metrics", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="metrics JSONL written by the training loop")
    parser.add_argument("--output", default=None, help="PNG to write (default: loss.png next to the input)")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "loss.png")
    try:
        records = read_metrics(args.metrics)
    except (OSError, MetricsFileError) as err:
        print(f"plot_metrics: error: {err}", file=sys.stderr)
        return 1
    if not any("lm_loss" in r for r in records):
        print(f"plot_metrics: error: {args.metrics} has no training records (no 'lm_loss')", file=sys.stderr)
        return 1
    plot(records, output, title=os.path.basename(args.metrics))
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
