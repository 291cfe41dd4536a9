"""Shard directories: index them, map a sample index to (shard, key), read a sample.

Layout written by ``toolkits/pretrain_data_preprocessing/build_webdataset.py``::

    DIR/shard-000000.tar        webdataset tar: KEY.json (canonical record), KEY.0.jpg, KEY.1.png ...
    DIR/shard-000000.idx.json   sidecar: byte offset and size of every member (random access)
    DIR/index.json              shard names, sample counts and byte sizes (no scan at start-up)

Training reads samples by random access (the resumable order is a permutation over the
whole dataset, not a stream): seek to a member's recorded offset, check its tar header
(checksum, size) and read its bytes. Without ``index.json`` the shards are scanned once
with ``tarfile``; a missing sidecar is rebuilt in memory by scanning that one shard.

Read failures raise ``BadSample`` with a stable reason: ``corrupt_tar_member``, ``bad_json``,
``missing_member``, ``shard_unreadable``. Undecodable image bytes are found by the loader.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

from megatron_patch.data.errors import BadSample, ShardIndexError

INDEX_FILE = "index.json"
SIDECAR_SUFFIX = ".idx.json"
INDEX_VERSION = "megatron_patch.shards/1"

CORRUPT_MEMBER = "corrupt_tar_member"
BAD_JSON = "bad_json"
MISSING_MEMBER = "missing_member"
SHARD_UNREADABLE = "shard_unreadable"

_BLOCK = tarfile.BLOCKSIZE
_IMAGE_SUFFIX = re.compile(r"^(\d+)\.([A-Za-z0-9]+)$")


def sidecar_path(tar_path: str) -> str:
    """``DIR/NAME.tar`` -> ``DIR/NAME.idx.json``."""
    return tar_path[: -len(".tar")] + SIDECAR_SUFFIX


def split_member(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename; rest = suffix."""
    head, base = os.path.split(name)
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


def scan_tar(tar_path: str) -> list:
    """Samples of one tar: ``[[key, [[suffix, data_offset, size], ...]], ...]`` in tar order."""
    samples: list = []
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, suffix = split_member(info.name)
                if not samples or samples[-1][0] != key:
                    samples.append([key, []])
                samples[-1][1].append([suffix, info.offset_data, info.size])
    except (tarfile.TarError, OSError) as exc:
        raise ShardIndexError(f"cannot scan shard {tar_path}: {exc}") from exc
    return samples


def write_sidecar(tar_path: str) -> dict:
    """Scan ``tar_path``, write its sidecar, return ``{"name", "num_samples", "bytes"}``."""
    samples = scan_tar(tar_path)
    info = {"name": os.path.basename(tar_path), "num_samples": len(samples),
            "bytes": os.path.getsize(tar_path)}
    with open(sidecar_path(tar_path), "w", encoding="utf-8") as f:
        json.dump({**info, "samples": samples}, f, separators=(",", ":"))
    return info


def write_index(shard_dir: str, shard_infos: list[dict]) -> dict:
    """Write ``index.json`` for ``shard_infos`` (as returned by ``write_sidecar``)."""
    shard_infos = sorted(shard_infos, key=lambda s: s["name"])
    index = {"version": INDEX_VERSION, "num_samples": sum(s["num_samples"] for s in shard_infos),
             "shards": shard_infos}
    with open(os.path.join(shard_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    return index


@dataclass
class RawSample:
    """One stored sample: its canonical record and image bytes in placeholder order."""

    shard: str
    key: str
    record: dict
    images: list = field(default_factory=list)      # bytes, one per record["images"] entry
    image_exts: list = field(default_factory=list)  # "jpg", "png", ...


class ShardedDataset:
    """Random access over the samples of one shard directory."""

    def __init__(self, shard_dir: str, sidecar_cache: int = 32):
        self.dir = os.path.abspath(shard_dir)
        if not os.path.isdir(self.dir):
            raise ShardIndexError(f"data path {shard_dir} is not a directory")
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = sidecar_cache
        index_path = os.path.join(self.dir, INDEX_FILE)
        if os.path.exists(index_path):
            self.shards = self._read_index(index_path)
        else:
            self.shards = self._scan_all()
        if not self.shards or all(s["num_samples"] == 0 for s in self.shards):
            raise ShardIndexError(f"data path {shard_dir} holds no samples (no *.tar shards?)")
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["num_samples"])

    # ---- index ---------------------------------------------------------------------------
    def _read_index(self, index_path: str) -> list[dict]:
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            shards = [dict(s) for s in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardIndexError(f"unreadable {index_path}: {exc}; delete it to scan") from exc
        for s in shards:
            path = os.path.join(self.dir, s["name"])
            if not os.path.isfile(path):
                raise ShardIndexError(f"shard {path} listed in {index_path} is missing")
            if os.path.getsize(path) != s["bytes"]:
                raise ShardIndexError(f"shard {path} changed size since {index_path} was "
                                      "written; rebuild the shards or delete index.json")
        return shards

    def _scan_all(self) -> list[dict]:
        shards = []
        for path in sorted(glob.glob(os.path.join(self.dir, "*.tar"))):
            samples = scan_tar(path)
            name = os.path.basename(path)
            shards.append({"name": name, "num_samples": len(samples),
                           "bytes": os.path.getsize(path)})
            self._remember(name, samples)
        return shards

    def _remember(self, name: str, samples: list) -> list:
        self._cache[name] = samples
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return samples

    def _samples_of(self, shard: dict) -> list:
        name = shard["name"]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        tar_path = os.path.join(self.dir, name)
        try:
            with open(sidecar_path(tar_path), encoding="utf-8") as f:
                samples = json.load(f)["samples"]
        except (OSError, ValueError, KeyError):
            samples = scan_tar(tar_path)  # no usable sidecar: scan this shard once
        if len(samples) != shard["num_samples"]:
            raise ShardIndexError(f"shard {tar_path}: sidecar lists {len(samples)} samples, "
                                  f"index.json {shard['num_samples']}; rebuild the index")
        return self._remember(name, samples)

    # ---- access --------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, index: int) -> tuple[str, str]:
        """Sample ``index`` -> (shard path, member key)."""
        shard, entry = self._entry(index)
        return os.path.join(self.dir, shard["name"]), entry[0]

    def _entry(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.dir} "
                             f"({self.num_samples} samples)")
        s = bisect.bisect_right(self._starts, index) - 1
        shard = self.shards[s]
        return shard, self._samples_of(shard)[index - self._starts[s]]

    def read(self, index: int) -> RawSample:
        """Read sample ``index``; raises ``BadSample`` when its bytes are unusable."""
        shard, (key, members) = self._entry(index)
        path = os.path.join(self.dir, shard["name"])
        try:
            with open(path, "rb") as f:
                blobs = {suffix: _read_member(f, path, key, suffix, off, size)
                         for suffix, off, size in members}
        except OSError as exc:
            raise BadSample(SHARD_UNREADABLE, path, key, str(exc)) from exc
        if "json" not in blobs:
            raise BadSample(MISSING_MEMBER, path, key, "no .json member")
        record = _parse_record(blobs["json"], path, key)
        images = sorted((int(m.group(1)), m.group(2).lower(), blob) for suffix, blob in blobs.items()
                        if (m := _IMAGE_SUFFIX.match(suffix)))
        if [i for i, _, _ in images] != list(range(len(record["images"]))):
            raise BadSample(MISSING_MEMBER, path, key,
                            f"record lists {len(record['images'])} images, tar holds {len(images)}")
        return RawSample(path, key, record, [b for _, _, b in images], [e for _, e, _ in images])


def _read_member(f, path: str, key: str, suffix: str, offset: int, size: int) -> bytes:
    """Read one member's bytes after checking the tar header block right before them."""
    name = f"{key}.{suffix}"
    if offset < _BLOCK:
        raise BadSample(CORRUPT_MEMBER, path, name, "bad offset in index")
    f.seek(offset - _BLOCK)
    buf = f.read(_BLOCK + size)
    if len(buf) != _BLOCK + size:
        raise BadSample(CORRUPT_MEMBER, path, name, "truncated shard")
    try:
        header = tarfile.TarInfo.frombuf(buf[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise BadSample(CORRUPT_MEMBER, path, name, f"bad tar header ({exc})") from exc
    # Names over 100 bytes live in a pax header before this block; compare only short ones.
    if header.size != size or (len(name.encode()) < 100 and header.name != name):
        raise BadSample(CORRUPT_MEMBER, path, name, "tar header does not match the index")
    return buf[_BLOCK:]


def _parse_record(blob: bytes, path: str, key: str) -> dict:
    try:
        record = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSample(BAD_JSON, path, key, str(exc)) from exc
    if not (isinstance(record, dict) and isinstance(record.get("messages"), list)
            and isinstance(record.get("images", []), list)):
        raise BadSample(BAD_JSON, path, key, "not a canonical record")
    record.setdefault("images", [])
    return record
