"""Where every metric goes: the log line (Megatron-LM's style), a JSONL file, tensorboard.

One rank reports (the training loop chooses it and passes ``enabled=True`` there only). Each record
is one JSON object per line, fsynced as it is written, so a killed run keeps all it logged;
``read_metrics`` reads a file back and forgives only a truncated last line. Non-finite floats are
written as JSON's ``NaN`` / ``Infinity`` extensions (Python reads them back; strict parsers do not).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

TRAINING_KEYS = (
    "iteration",
    "consumed_samples",
    "lm_loss",
    "grad_norm",
    "lr",
    "loss_scale",
    "skipped_iterations",
    "nan_iterations",
    "bad_samples",
    "tokens_per_second",
    "tflops_per_device",
    "mfu",
    "elapsed_ms_per_iteration",
    "time_left_seconds",
)
"""Keys of every training record (``mfu`` and ``grad_norm`` may be None)."""

VALIDATION_KEYS = ("iteration", "validation_loss", "validation_ppl", "validation_tokens")
"""Keys of every validation record."""


class MetricsFileError(ValueError):
    """A metrics JSONL file that cannot be read back (corrupted before its last line)."""


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_training_line(record: dict, train_iters: Optional[int] = None) -> str:
    """One training log line, Megatron-LM's layout (` iteration       10/     100 | ...`)."""
    it = f"{record['iteration']:8d}" + (f"/{train_iters:8d}" if train_iters is not None else "")
    mfu = record.get("mfu")
    fields = [
        f" iteration {it}",
        f"consumed samples: {record.get('consumed_samples', 0):12d}",
        f"lm loss: {_num(record.get('lm_loss'), '.6E')}",
        f"grad norm: {_num(record.get('grad_norm'), '.3f')}",
        f"lr: {_num(record.get('lr'), '.6E')}",
        f"loss scale: {_num(record.get('loss_scale'), '.1f')}",
        f"skipped: {record.get('skipped_iterations', 0)}",
        f"nan: {record.get('nan_iterations', 0)}",
        f"bad samples: {record.get('bad_samples', 0)}",
        f"tokens/s: {_num(record.get('tokens_per_second'), '.1f')}",
        f"TFLOP/s/device: {_num(record.get('tflops_per_device'), '.2f')}",
        f"MFU: {'n/a' if mfu is None else format(mfu, '.1%')}",
    ]
    if "elapsed_ms_per_iteration" in record:  # Megatron-LM's figure, and what is left at that pace
        left = record.get("time_left_seconds")
        fields.insert(2, f"elapsed time per iteration (ms): {_num(record['elapsed_ms_per_iteration'], '.1f')}")
        fields.insert(3, f"time left: {'n/a' if left is None else _duration(left)}")
    return " | ".join(fields) + " |"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_validation_line(record: dict) -> str:
    """One validation log line (Megatron-LM prints loss and PPL of the validation set)."""
    fields = [
        f" validation at iteration {record['iteration']:8d}",
        f"lm loss: {_num(record.get('validation_loss'), '.6E')}",
        f"lm loss PPL: {_num(record.get('validation_ppl'), '.6E')}",
        f"tokens: {record.get('validation_tokens', 0)}",
    ]
    return " | ".join(fields) + " |"


def format_record(record: dict, train_iters: Optional[int] = None) -> str:
    """The log line of a training or validation record; other records as `key: value | ...`."""
    if "lm_loss" in record:
        return format_training_line(record, train_iters)
    if "validation_loss" in record:
        return format_validation_line(record)
    return " " + " | ".join(f"{k}: {v}" for k, v in record.items())


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsWriter:
    """Writes records to stdout, a JSONL file, tensorboard and W&B, on the reporting rank only.

    jsonl_path / tensorboard_dir: None to skip that sink. enabled: False on every other rank (then
    nothing is created or written). train_iters: shown in the default training line.
    """

    def __init__(self, jsonl_path: Optional[str], tensorboard_dir: Optional[str], enabled: bool,
                 train_iters: Optional[int] = None, wandb_run=None):
        self.enabled, self.train_iters = bool(enabled), train_iters
        self._file = self._tensorboard = None
        self._wandb = wandb_run  # wandb_run.WandbRun, made on the reporting rank only
        if not self.enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._file = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError(
                    f"--tensorboard-dir {tensorboard_dir} needs the tensorboard package ({err}); "
                    f"pip install tensorboard, or drop the flag"
                ) from None
            self._tensorboard = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record: dict, line: Optional[str] = None) -> None:
        """Append `record` to the JSONL (durably), print `line` (default: its log line), add tensorboard scalars."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())  # a killed run keeps every line it logged
        print(line if line is not None else format_record(record, self.train_iters), flush=True)
        if self._tensorboard is not None:
            step = int(record["iteration"])
            for key, value in record.items():
                if key != "iteration" and _is_scalar(value):
                    self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(message: str) -> None:
    """Print `[megatron_patch] message` on global rank 0 (or when torch.distributed is not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"[megatron_patch] {message}", flush=True)


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics JSONL file, in order.

    A last line cut short (no newline, not JSON: the run was killed mid-write) is dropped; any other
    line that is not a JSON object raises MetricsFileError naming the file and line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"metrics file {path} does not exist") from None
    lines = text.split("\n")  # a complete file ends with "\n": its last element is ""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # truncated by a kill while writing
            raise MetricsFileError(
                f"{path} line {number}: not a JSON record ({err.msg}); the file is corrupted"
            ) from None
        if not isinstance(record, dict):
            raise MetricsFileError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def perplexity(loss: float) -> float:
    """`validation_ppl`: exp(loss) with the loss capped at 700 (a finite number that JSON and every
    logger take); a NaN or infinite loss is passed through as it is."""
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else loss
