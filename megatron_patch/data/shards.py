"""Shard datasets: index them, map a sample index to (shard, key), read a sample.

Layout written by ``toolkits/pretrain_data_preprocessing/build_webdataset.py``::

    DIR/shard-000000.tar        webdataset tar: KEY.json (canonical record), KEY.0.jpg, KEY.1.png ...
    DIR/shard-000000.idx.json   sidecar: byte offset and size of every member (random access)
    DIR/index.json              shard names, sample counts and byte sizes (no scan at start-up)

``DIR`` is any location ``storage.open_location`` accepts: a local folder, ``file:///abs``,
an fsspec URL (``s3://bucket/prefix``, ``memory://...``) or ``pipe:CMD {name}``. Every file,
index and sidecars included, is read through that one ``Location``.

Training reads samples by random access (the resumable order is a permutation over the
whole dataset, not a stream): one read of a sample's bytes (its members are adjacent in the
tar; a range request on object stores, a stream read up to the sample through ``pipe:``),
then each member's tar header is checked (checksum, size, name). Without ``index.json`` the
shards are listed and scanned once with ``tarfile`` (impossible through ``pipe:``); a missing
sidecar is rebuilt in memory by scanning that one shard through the same location. Shard sizes
in ``index.json`` are checked against the storage, except through ``pipe:`` (unknowable there
without reading every shard).

Read failures raise ``BadSample`` with a stable reason: ``corrupt_tar_member``, ``bad_json``,
``missing_member``, ``shard_unreadable`` (a failing pipe command included). Undecodable image
bytes are found by the loader.
"""
from __future__ import annotations

import bisect
import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

from megatron_patch.data.errors import BadSample, ShardIndexError
from megatron_patch.data.storage import LocalLocation, PipeLocation, open_location

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
    """Samples of one local tar: ``[[key, [[suffix, data_offset, size], ...]], ...]`` in tar order."""
    try:
        with open(tar_path, "rb") as f:
            return scan_tar_file(f, tar_path)
    except OSError as exc:
        raise ShardIndexError(f"cannot scan shard {tar_path}: {exc}") from exc


def scan_tar_file(fileobj, where: str, stream: bool = False) -> list:
    """``scan_tar`` over an open binary file; ``stream=True`` reads it forward only (a pipe).

    Raises ``ShardIndexError`` naming ``where`` for a broken tar; ``OSError`` from ``fileobj``
    (e.g. a failing pipe command) propagates.
    """
    samples: list = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|" if stream else "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, suffix = split_member(info.name)
                if not samples or samples[-1][0] != key:
                    samples.append([key, []])
                samples[-1][1].append([suffix, info.offset_data, info.size])
    except tarfile.TarError as exc:
        raise ShardIndexError(f"cannot scan shard {where}: {exc}") from exc
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
    """Random access over the samples of one shard dataset (a folder, fsspec URL or pipe:)."""

    def __init__(self, location, sidecar_cache: int = 32):
        self.location = open_location(location)
        self.dir = self.location.url  # printable: a local path, a URL or pipe:TEMPLATE
        if isinstance(self.location, LocalLocation) and not os.path.isdir(self.dir):
            raise ShardIndexError(f"data path {location} is not a directory")
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = sidecar_cache
        index = self._load_index()
        self.shards = self._check_index(index) if index is not None else self._scan_all()
        if not self.shards or all(s["num_samples"] == 0 for s in self.shards):
            raise ShardIndexError(f"data path {self.dir} holds no samples (no *.tar shards?)")
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["num_samples"])

    # ---- index ---------------------------------------------------------------------------
    def _load_index(self) -> dict | None:
        """``index.json`` as a dict; None when a listable location has none (scan instead)."""
        where = self.location.describe(INDEX_FILE)
        try:
            blob = self.location.read_bytes(INDEX_FILE)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a failing pipe command lands here too
            hint = "; a pipe: data path needs index.json (a pipe cannot list shards)" \
                if isinstance(self.location, PipeLocation) else ""
            raise ShardIndexError(f"cannot read {where}: {exc}{hint}") from exc
        try:
            return json.loads(blob)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShardIndexError(f"unreadable {where}: {exc}; delete it to scan") from exc

    def _check_index(self, index: dict) -> list[dict]:
        where = self.location.describe(INDEX_FILE)
        try:
            shards = [dict(s) for s in index["shards"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardIndexError(f"unreadable {where}: {exc!r}; delete it to scan") from exc
        if not all({"name", "num_samples", "bytes"} <= s.keys() for s in shards):
            raise ShardIndexError(f"unreadable {where}: a shard entry lacks name, num_samples or bytes; "
                                  "delete it to scan")
        for s in shards:
            path = self.location.describe(s["name"])
            try:
                size = self.location.size(s["name"])
            except FileNotFoundError:
                raise ShardIndexError(f"shard {path} listed in {where} is missing") from None
            except OSError as exc:
                raise ShardIndexError(f"shard {path} listed in {where} is unreadable: {exc}") from exc
            # size is None through pipe:, where only reading the whole stream would tell.
            if size is not None and size != s["bytes"]:
                raise ShardIndexError(f"shard {path} changed size since {where} was "
                                      "written; rebuild the shards or delete index.json")
        return shards

    def _scan_all(self) -> list[dict]:
        shards = []
        names = self.location.list_tars()
        if not names:
            self.location.check()  # a missing folder says so, rather than "holds no samples"
        for name in names:
            samples = self._scan(name)
            shards.append({"name": name, "num_samples": len(samples),
                           "bytes": self.location.size(name)})
            self._remember(name, samples)
        return shards

    def _scan(self, name: str) -> list:
        if isinstance(self.location, LocalLocation):
            return scan_tar(self.location.describe(name))
        where = self.location.describe(name)
        try:
            with self.location.open(name) as f:
                return scan_tar_file(f, where, stream=not self.location.seekable)
        except OSError as exc:  # opening failed, or a pipe command failed while streaming
            raise ShardIndexError(f"cannot scan shard {where}: {exc}") from exc

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
        try:
            samples = json.loads(self.location.read_bytes(sidecar_path(name)))["samples"]
        except (OSError, ValueError, KeyError, TypeError):
            samples = self._scan(name)  # no usable sidecar: scan this shard once, from the same place
        if len(samples) != shard["num_samples"]:
            raise ShardIndexError(f"shard {self.location.describe(name)}: sidecar lists {len(samples)} "
                                  f"samples, index.json {shard['num_samples']}; rebuild the index")
        return self._remember(name, samples)

    # ---- access --------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, index: int) -> tuple[str, str]:
        """Sample ``index`` -> (shard path or URL, member key)."""
        shard, entry = self._entry(index)
        return self.location.describe(shard["name"]), entry[0]

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
        path = self.location.describe(shard["name"])
        # A sample's members are adjacent in the tar: read them in one go (one range request),
        # from the first member's header to the last member's data.
        start = max(0, min(off for _, off, _ in members) - _BLOCK)
        end = max(off + size for _, off, size in members)
        try:
            span = self.location.read_range(shard["name"], start, end)
        except OSError as exc:
            raise BadSample(SHARD_UNREADABLE, path, key, str(exc)) from exc
        blobs = {suffix: _check_member(span[max(0, off - _BLOCK - start): off + size - start],
                                       path, key, suffix, off, size)
                 for suffix, off, size in members}
        if "json" not in blobs:
            raise BadSample(MISSING_MEMBER, path, key, "no .json member")
        record = _parse_record(blobs["json"], path, key)
        images = sorted((int(m.group(1)), m.group(2).lower(), blob) for suffix, blob in blobs.items()
                        if (m := _IMAGE_SUFFIX.match(suffix)))
        if [i for i, _, _ in images] != list(range(len(record["images"]))):
            raise BadSample(MISSING_MEMBER, path, key,
                            f"record lists {len(record['images'])} images, tar holds {len(images)}")
        return RawSample(path, key, record, [b for _, _, b in images], [e for _, e, _ in images])


def read_member(f, path: str, key: str, suffix: str, offset: int, size: int) -> bytes:
    """Read one member's bytes from seekable ``f`` after checking the tar header right before them."""
    if offset < _BLOCK:
        raise BadSample(CORRUPT_MEMBER, path, f"{key}.{suffix}", "bad offset in index")
    f.seek(offset - _BLOCK)
    return _check_member(f.read(_BLOCK + size), path, key, suffix, offset, size)


def _check_member(buf: bytes, path: str, key: str, suffix: str, offset: int, size: int) -> bytes:
    """``buf`` = the header block + data of member ``KEY.suffix``: check the header, return the data."""
    name = f"{key}.{suffix}"
    if offset < _BLOCK:
        raise BadSample(CORRUPT_MEMBER, path, name, "bad offset in index")
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
