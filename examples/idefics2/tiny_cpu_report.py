"""Two small reports of `run_tiny_cpu.sh`.

    python examples/idefics2/tiny_cpu_report.py loss METRICS.jsonl [--min-drop 0.5]
        one line "loss fell from A to B ..."; exit 1 unless the last training loss is at most
        (1 - min_drop) x the first (a resumed run's repeated iterations count once, the last record wins)
    python examples/idefics2/tiny_cpu_report.py preds PREDS.jsonl [--show 6]
        the first predictions next to their references
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_patch.training.metrics import read_metrics


def loss_report(path: str, min_drop: float) -> int:
    records = read_metrics(path)
    losses = {int(r["iteration"]): float(r["lm_loss"]) for r in records if r.get("lm_loss") is not None}
    if not losses:
        print(f"tiny_cpu_report: error: {path} has no training loss records", file=sys.stderr)
        return 1
    first, last = losses[min(losses)], losses[max(losses)]
    valid = [r["validation_loss"] for r in records if "validation_loss" in r]
    tail = f"; last validation loss {valid[-1]:.3f}" if valid else ""
    print(f"loss fell from {first:.3f} (iteration {min(losses)}) to {last:.3f} (iteration {max(losses)}){tail}")
    if not last <= (1 - min_drop) * first:
        print(f"tiny_cpu_report: error: the training loss fell by less than {min_drop:.0%} "
              f"({first:.3f} -> {last:.3f})", file=sys.stderr)
        return 1
    return 0


def preds_report(path: str, show: int) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:show]
    width = max([len("reference")] + [len(r["reference"]) for r in rows])
    print(f"{'reference':<{width}}  prediction")
    for r in rows:
        mark = "=" if " ".join(r["prediction"].casefold().split()) == " ".join(r["reference"].casefold().split()) else " "
        print(f"{r['reference']:<{width}}{mark} {r['prediction']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tiny_cpu_report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    loss = sub.add_parser("loss")
    loss.add_argument("metrics")
    loss.add_argument("--min-drop", type=float, default=0.5, help="fraction the loss must fall by")
    preds = sub.add_parser("preds")
    preds.add_argument("predictions")
    preds.add_argument("--show", type=int, default=6)
    args = p.parse_args(argv)
    if args.what == "loss":
        return loss_report(args.metrics, args.min_drop)
    return preds_report(args.predictions, args.show)


if __name__ == "__main__":
    sys.exit(main())
