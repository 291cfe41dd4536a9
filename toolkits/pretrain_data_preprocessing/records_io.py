"""Read LLaVA / ShareGPT input files and check records; shared by the converter and shard builder.

Input files are either one JSON array of records or JSON Lines (one record per line, blank
lines ignored). A JSONL line that is not valid JSON is kept as an ``Unparsable`` item so it
is counted as a ``malformed_record`` instead of aborting the whole run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from megatron_patch.data import formats


@dataclass
class Unparsable:
    """A JSONL line that is not JSON."""

    text: str
    error: str


def read_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, record)`` for every record of ``path`` (JSON array or JSONL)."""
    try:
        f = open(path, encoding="utf-8-sig")  # tolerate a BOM
    except OSError as exc:
        raise SystemExit(f"error: --input {path}: {exc.strerror}")
    with f:
        first = ""
        while not first:
            chunk = f.read(1)
            if not chunk:
                return  # empty file: no records
            first = chunk.strip()
        f.seek(0)
        if first == "[":
            try:
                records = json.load(f)
            except ValueError as exc:
                raise SystemExit(f"error: --input {path} starts with '[' but is not valid JSON: {exc}")
            yield from enumerate(records)
            return
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except ValueError as exc:
                yield index, Unparsable(line[:200], str(exc))
            index += 1


def check_record(index: int, item: Any, fmt: str | None, max_image_num: int):
    """Return ``(canonical_or_None, problems, printable_id, detected_format)``."""
    rid = formats.record_id(item, index)
    if isinstance(item, Unparsable):
        return None, [formats.MALFORMED], rid, None
    detected = fmt or formats.detect_format(item)
    problems = formats.validate_record(item, fmt, max_image_num)
    if problems:
        return None, problems, rid, detected
    return formats.to_canonical(item, fmt, index, max_image_num), [], rid, detected


def format_flag(value: str) -> str | None:
    """``--format auto`` means per-record detection (None)."""
    return None if value == "auto" else value
