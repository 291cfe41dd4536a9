"""Write one webdataset shard from one chunk of input records (runs inside a worker process).

Each valid record becomes the members ``KEY.json`` (canonical record, UTF-8) and
``KEY.<i>.<ext>`` (image i's bytes exactly as stored, original extension lower-cased).
KEY is the record's 0-based position in the input file, zero padded, so keys are unique
across shards and independent of worker timing. Records that fail a check are counted
under their first problem kind and not written.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image

from megatron_patch.data import formats
from megatron_patch.data.shards import write_sidecar
from toolkits.pretrain_data_preprocessing.records_io import check_record

# Fixed mtime: identical input gives byte-identical shards.
_MTIME = 0.0
_MAX_EXAMPLES = 5


@dataclass
class ShardTask:
    shard_id: int
    records: list  # [(index, raw record), ...]
    output_dir: str
    image_folder: str
    fmt: str | None
    max_image_num: int
    prefix: str = "shard"


@dataclass
class ShardResult:
    shard_id: int
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    formats: Counter = field(default_factory=Counter)
    shard_info: dict | None = None  # {"name", "num_samples", "bytes"}; None: nothing written


def shard_name(prefix: str, shard_id: int) -> str:
    return f"{prefix}-{shard_id:06d}.tar"


def _load_images(canonical: dict, root: str):
    """Return ``(problem, [(ext, bytes), ...])`` for the record's images."""
    loaded = []
    for rel in canonical["images"]:
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, full]) != root:  # e.g. a symlink pointing outside
            return formats.PATH_ESCAPE, []
        if not os.path.isfile(full):
            return formats.MISSING_IMAGE, []
        with open(full, "rb") as f:
            data = f.read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as im:
                    im.load()  # full decode: truncated files fail here, not in training
                    pil_format = (im.format or "img").lower()
        except Exception:  # PIL raises many types for bad bytes
            return formats.UNDECODABLE_IMAGE, []
        ext = os.path.splitext(rel)[1][1:].lower()
        loaded.append((ext if ext.isalnum() else pil_format, data))
    return None, loaded


def write_shard(task: ShardTask) -> ShardResult:
    """Check, convert and write the records of ``task``; return its counts."""
    result = ShardResult(task.shard_id)
    root = os.path.realpath(task.image_folder)
    final = os.path.join(task.output_dir, shard_name(task.prefix, task.shard_id))
    tmp = final + ".tmp"
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=_MTIME)
        for index, item in task.records:
            result.read += 1
            canonical, problems, rid, detected = check_record(index, item, task.fmt,
                                                              task.max_image_num)
            result.formats[detected or "unknown"] += 1
            problem = problems[0] if problems else None
            images = []
            if problem is None:
                problem, images = _load_images(canonical, root)
            if problem is not None:
                result.skipped[problem] += 1
                result.examples.setdefault(problem, [])
                if len(result.examples[problem]) < _MAX_EXAMPLES:
                    result.examples[problem].append(rid)
                continue
            sample = {"__key__": f"{index:09d}",
                      "json": json.dumps(canonical, ensure_ascii=False).encode("utf-8")}
            for i, (ext, data) in enumerate(images):
                sample[f"{i}.{ext}"] = data
            writer.write(sample)
            result.written += 1
        writer.close()
    if result.written == 0:
        os.remove(tmp)  # no empty shards
        return result
    os.replace(tmp, final)
    result.shard_info = write_sidecar(final)
    return result
