"""Shared command-line plumbing of the converters: sizes, progress bars, summaries, error exits."""
from __future__ import annotations

import re
import sys
import time
from typing import Callable, Optional

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.errors import one_line

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'512MB', '5GB', '1GiB', '1000' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise CheckpointError(f"size {text!r} is not like '512MB', '5GB' or '1GiB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress(iterable, total: int, desc: str, unit: str = "tensor"):
    """A tqdm bar on stderr (pass iterable=None and call .update(n) to count by hand)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


class Summary:
    """Counts what a tool read and wrote and prints one closing line."""

    def __init__(self, prog: str):
        self.prog = prog
        self.start = time.perf_counter()
        self.read_tensors = self.read_bytes = 0
        self.written_tensors = self.written_bytes = 0

    def read(self, tensor) -> None:
        self.read_tensors += 1
        self.read_bytes += tensor.nbytes

    def line(self, destination, status: str = "created") -> str:
        seconds = time.perf_counter() - self.start
        return (
            f"{self.prog}: read {self.read_tensors} tensors ({human_bytes(self.read_bytes)}), "
            f"wrote {self.written_tensors} tensors ({human_bytes(self.written_bytes)}) in {seconds:.1f} s "
            f"-> {destination} [{status}]"
        )


def run_tool(prog: str, body: Callable[[], Optional[str]]) -> int:
    """Run a tool body; a CheckpointError / ValueError / KeyError / OSError becomes one 'error:' line
    (white space collapsed, so a library's multi-line message stays one line) and exit code 1."""
    try:
        line = body()
    except (CheckpointError, ValueError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        return 1
    if line:
        print(line)
    return 0
