"""megatron-energon interop: read energon-prepared webdatasets; cook our shards inside energon.

Reading (``EnergonDataset``; needs only our code, ``pyyaml`` and ``braceexpand``, no energon)
------------------------------------------------------------------------------------------
``energon prepare DIR`` leaves ``DIR/.nv-meta/``::

    .info.json (or legacy .info.yaml)   {"shard_counts": {"shard.tar": N, ...}}  (prepare order)
    split.yaml (or split.json)          {"split_parts": {"train": ["a-{0..9}.tar"]},
                                         "exclude": ["a-3.tar", "a-4.tar/KEY", ...]}
    index.sqlite                        samples(tar_file_id, sample_key, sample_index, ...) and
                                        sample_parts(tar_file_id, sample_index, part_name,
                                        content_byte_offset, content_byte_size)
    dataset.yaml                        energon's sample type (not needed here)

``EnergonDataset(DIR, split_part)`` takes the split's shards (brace-expanded, minus excludes) and
their counts from that metadata, and each sample's member offsets from ``index.sqlite``
(``tar_file_id`` is the position in ``.info.json``'s ``shard_counts``); without the sqlite it
scans the tar once with ``shards.scan_tar``. Members are read and checked like ``ShardedDataset``
does (tar header before each member), so damaged data raises the same ``BadSample`` reasons.

Local folders only (energon's own remote paths are not handled here). ``datasets.open_dataset``
picks it for a folder with ``.nv-meta/`` and no ``index.json``; the loader takes either reader.

Sample conversion (``sample_from_parts``; shared by reading and by the energon cooker)
---------------------------------------------------------------------------------------
* ``KEY.json`` holds either a list of LLaVA turns (Megatron-LM's LLaVA recipe writes
  ``json.dumps(entry["conversations"])``) or a whole record (LLaVA, ShareGPT, or our canonical one).
  It goes through ``formats.to_canonical``; a record it rejects is ``BadSample`` under the
  problem kind (``wrong_role``, ``image_count_mismatch``, ...).
* Images in placeholder order: ``KEY.0.jpg``, ``KEY.1.png``, ... (our layout), else one plain
  image member (``KEY.jpg``; the LLaVA recipe). Both kinds, or several plain ones, is
  ``ambiguous_images``. Image paths the record lists are kept; a record without them gets the
  member names.

Cooking our shards in energon (``chat_cooker``; needs megatron-energon)
----------------------------------------------------------------------
Our records are multi-image, multi-turn chats; none of energon's built-in sample types holds
roles and several images in order (``VQASample`` has one image and one turn, ``InterleavedSample``
drops the roles). So ``toolkits/pretrain_data_preprocessing/energon_prepare.py`` declares the
folder a ``CrudeWebdataset`` and energon users cook it with ``chat_cooker()`` into ``ChatSample``
(``id``, ``messages``, ``images`` in placeholder order, ``image_exts``). ``ChatSample`` is built on
first use (module ``__getattr__``), so importing this module never imports energon.
"""
from __future__ import annotations

import bisect
import json
import os
import re
import sqlite3
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import braceexpand
import yaml

from megatron_patch.data import formats
from megatron_patch.data.errors import BadSample, ShardIndexError
from megatron_patch.data.shards import (BAD_JSON, MISSING_MEMBER, SHARD_UNREADABLE, RawSample,
                                        read_member, scan_tar)

META_DIR = ".nv-meta"
INFO_FILES = (".info.json", ".info.yaml")
INDEX_SQLITE = "index.sqlite"
AMBIGUOUS_IMAGES = "ambiguous_images"
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})

_INDEXED_IMAGE = re.compile(r"^(\d+)\.([A-Za-z0-9]+)$")
_ENERGON_SKIPPED = re.compile(r"__[^/]*__($|/)")  # members energon's prepare ignores


def is_energon_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, META_DIR))


# ---- .nv-meta ------------------------------------------------------------------------------
def _load(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f) if path.endswith(".json") else yaml.safe_load(f)


def _meta_error(path: str, problem: str) -> ShardIndexError:
    folder = os.path.dirname(os.path.dirname(path))
    return ShardIndexError(f"energon metadata {path}: {problem}; rerun `energon prepare {folder}`")


def read_shard_counts(root: str) -> dict:
    """``{shard name: sample count}`` from ``.info.json`` / ``.info.yaml``, in prepare order."""
    meta = os.path.join(root, META_DIR)
    path = next((os.path.join(meta, n) for n in INFO_FILES if os.path.isfile(os.path.join(meta, n))),
                os.path.join(meta, INFO_FILES[0]))
    try:
        counts = _load(path)["shard_counts"]
        counts = {str(k): int(v) for k, v in counts.items()}
    except FileNotFoundError:
        raise _meta_error(path, "missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise _meta_error(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    return counts


def read_split(root: str, split_part: str = "train", split_config: str = "split.yaml"):
    """Shards of ``split_part``: ``([{"name", "count", "file_id"}], excluded sample names)``.

    Follows energon's rules: names brace-expanded, ``exclude`` entries without '/' drop shards,
    ``SHARD/KEY`` entries drop samples (``count`` is the prepared count, before those).
    """
    meta = os.path.join(root, META_DIR)
    path = os.path.join(meta, split_config)
    if not os.path.isfile(path) and split_config == "split.yaml":
        path = os.path.join(meta, "split.json") if os.path.isfile(os.path.join(meta, "split.json")) else path
    try:
        split = _load(path)
        parts, exclude = split["split_parts"], split.get("exclude") or []
        names = [n for pattern in parts[split_part] for n in braceexpand.braceexpand(pattern)] \
            if split_part in parts else None
        excluded = {e for pattern in exclude for e in braceexpand.braceexpand(pattern)}
    except FileNotFoundError:
        raise _meta_error(path, "missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise _meta_error(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    if names is None:
        raise _meta_error(path, f"no split part {split_part!r} (has {sorted(parts)})")
    counts = read_shard_counts(root)
    file_ids = {name: i for i, name in enumerate(counts)}
    shards = []
    for name in names:
        if name in excluded:
            continue
        if name not in counts:
            raise _meta_error(path, f"shard {name} of split {split_part!r} is not in .info shard_counts")
        if not os.path.isfile(os.path.join(root, name)):
            raise _meta_error(path, f"shard {os.path.join(root, name)} is missing")
        shards.append({"name": name, "count": counts[name], "file_id": file_ids[name]})
    if not shards or all(s["count"] <= 0 for s in shards):
        raise _meta_error(path, f"split part {split_part!r} holds no samples")
    return shards, {e for e in excluded if "/" in e}


def _sqlite_samples(db_path: str, file_id: int) -> list:
    """One shard's samples from energon's index: ``[[key, [[part, offset, size], ...]], ...]``."""
    # A fresh read-only connection per shard: sqlite handles must not cross the loader's fork.
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    con = sqlite3.connect(uri, uri=True)
    try:
        rows = con.execute(
            "SELECT s.sample_key, p.part_name, p.content_byte_offset, p.content_byte_size "
            "FROM samples s JOIN sample_parts p "
            "ON p.tar_file_id = s.tar_file_id AND p.sample_index = s.sample_index "
            "WHERE s.tar_file_id = ? ORDER BY s.sample_index, p.content_byte_offset", (file_id,))
        samples: list = []
        for key, part, offset, size in rows:
            if not samples or samples[-1][0] != key:
                samples.append([key, []])
            samples[-1][1].append([part, int(offset), int(size)])
        return samples
    finally:
        con.close()


def _scanned_samples(tar_path: str) -> list:
    """``scan_tar`` minus the members energon's prepare skips (meta folders, names without '.')."""
    samples = []
    for key, members in scan_tar(tar_path):
        members = [m for m in members if m[0] and not _ENERGON_SKIPPED.match(f"{key}.{m[0]}")]
        if members:
            samples.append([key, members])
    return samples


# ---- sample conversion ---------------------------------------------------------------------
def _ordered_images(parts: dict, shard: str, key: str) -> list:
    """``[(suffix, ext), ...]`` of the image parts in placeholder order."""
    indexed = sorted((int(m.group(1)), s, m.group(2).lower()) for s in parts
                     if (m := _INDEXED_IMAGE.match(s)))
    plain = sorted(s for s in parts if s.lower() in IMAGE_EXTS)
    if indexed and plain or len(plain) > 1:
        raise BadSample(AMBIGUOUS_IMAGES, shard, key, f"image members {sorted(parts)}: order unknown")
    if plain:
        return [(plain[0], plain[0].lower())]
    if [i for i, _, _ in indexed] != list(range(len(indexed))):
        raise BadSample(MISSING_MEMBER, shard, key, f"image members {[s for _, s, _ in indexed]} "
                        "are not numbered 0..n-1")
    return [(s, ext) for _, s, ext in indexed]


def sample_from_parts(parts: dict, shard: str, key: str):
    """Parts of one webdataset sample -> ``(canonical record, images, image exts)``.

    ``parts`` maps suffix -> bytes (or energon-decoded values: a parsed ``json``, image tensors).
    """
    if "json" not in parts:
        raise BadSample(MISSING_MEMBER, shard, key, "no .json member")
    doc = parts["json"]
    if isinstance(doc, (bytes, bytearray)):
        try:
            doc = json.loads(doc.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadSample(BAD_JSON, shard, key, str(exc)) from exc
    if isinstance(doc, list):  # Megatron-LM's LLaVA recipe: the conversation alone
        doc = {"id": key, "conversations": doc}
    elif isinstance(doc, dict):
        doc = {"id": key, **doc}
    else:
        raise BadSample(BAD_JSON, shard, key, "json is neither a conversation list nor a record")
    image_parts = _ordered_images(parts, shard, key)
    if formats.detect_format(doc) == "llava":
        doc.setdefault("image", [f"{key}.{s}" for s, _ in image_parts])
    else:
        doc.setdefault("images", [f"{key}.{s}" for s, _ in image_parts])
    try:
        # No image-count policy here: that was the builder's call; the reader takes what is stored.
        record = formats.to_canonical(doc, max_image_num=sys.maxsize)
    except formats.RecordError as exc:
        raise BadSample(exc.problems[0], shard, key, str(exc)) from exc
    if len(record["images"]) != len(image_parts):
        raise BadSample(MISSING_MEMBER, shard, key,
                        f"record lists {len(record['images'])} images, tar holds {len(image_parts)}")
    return record, [parts[s] for s, _ in image_parts], [ext for _, ext in image_parts]


# ---- reader --------------------------------------------------------------------------------
class EnergonDataset:
    """Random access over one split of a local energon-prepared webdataset folder, with the
    interface the loader uses (``len``, ``num_samples``, ``read``, ``locate``), as ``ShardedDataset``."""

    def __init__(self, path: str, split_part: str = "train", split_config: str = "split.yaml",
                 index_cache: int = 32):
        self.dir = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.dir):
            raise ShardIndexError(f"data path {path} is not a directory")
        if not is_energon_dir(self.dir):
            raise ShardIndexError(f"data path {path} has no {META_DIR}/ (run `energon prepare {path}`)")
        self.split_part = split_part
        self.shards, self._excluded = read_split(self.dir, split_part, split_config)
        db = os.path.join(self.dir, META_DIR, INDEX_SQLITE)
        self._db = db if os.path.isfile(db) else None
        self._cache: OrderedDict = OrderedDict()  # shard name -> its samples (LRU)
        self._cache_size = index_cache
        for s in self.shards:
            s["num_samples"] = s["count"]
            if any(e.startswith(s["name"] + "/") for e in self._excluded):
                # Only the shard's index tells which excluded keys exist (energon ignores the others).
                s["num_samples"] = len(self._samples_of(s))
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["num_samples"])
        if self.num_samples == 0:
            raise ShardIndexError(f"data path {path}: split {split_part!r} holds no samples")

    @property
    def num_samples(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return self.num_samples

    def _samples_of(self, shard: dict) -> list:
        name = shard["name"]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        tar_path = os.path.join(self.dir, name)
        samples = None
        if self._db is not None:
            try:
                samples = _sqlite_samples(self._db, shard["file_id"])
            except sqlite3.Error as exc:  # a scan is as good for us; energon itself will complain
                warnings.warn(f"unreadable {self._db} ({exc}); scanning {tar_path} instead")
        if samples is None:
            samples = _scanned_samples(tar_path)
        if len(samples) != shard["count"]:
            raise ShardIndexError(f"shard {tar_path}: {META_DIR} counts {shard['count']} samples, "
                                  f"its index holds {len(samples)}; rerun `energon prepare {self.dir}`")
        if self._excluded:
            samples = [s for s in samples if f"{name}/{s[0]}" not in self._excluded]
        self._cache[name] = samples
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return samples

    def _entry(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.dir} split {self.split_part!r} "
                             f"({self.num_samples} samples)")
        s = bisect.bisect_right(self._starts, index) - 1
        shard = self.shards[s]
        return shard, self._samples_of(shard)[index - self._starts[s]]

    def locate(self, index: int) -> tuple[str, str]:
        """Sample ``index`` -> (shard path, member key)."""
        shard, entry = self._entry(index)
        return os.path.join(self.dir, shard["name"]), entry[0]

    def read(self, index: int) -> RawSample:
        """Read sample ``index`` as a canonical record; ``BadSample`` when its bytes are unusable."""
        shard, (key, members) = self._entry(index)
        path = os.path.join(self.dir, shard["name"])
        try:
            with open(path, "rb") as f:
                blobs = {suffix: read_member(f, path, key, suffix, off, size)
                         for suffix, off, size in members}
        except OSError as exc:
            raise BadSample(SHARD_UNREADABLE, path, key, str(exc)) from exc
        record, images, exts = sample_from_parts(blobs, path, key)
        return RawSample(path, key, record, images, exts)


# ---- energon cooker (imports megatron.energon on first use) --------------------------------
def _chat_sample_class():
    from megatron.energon import Sample, edataclass

    @edataclass
    class ChatSample(Sample):
        """One chat: canonical ``messages``, ``images`` (bytes or decoded) in placeholder order."""

        id: str
        messages: list
        images: list
        image_exts: list

    # Pickled by name (energon's worker processes send samples back): make the name resolvable.
    ChatSample.__module__, ChatSample.__qualname__ = __name__, "ChatSample"
    globals()["ChatSample"] = ChatSample
    return ChatSample


def __getattr__(name: str):
    if name == "ChatSample":
        return _chat_sample_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cook_chat(crude: dict):
    """energon crude sample (``__key__``, ``__shard__``, parts) -> ``ChatSample``."""
    from megatron.energon import basic_sample_keys

    key = crude["__key__"]
    parts = {k: v for k, v in crude.items() if not k.startswith("__")}
    record, images, exts = sample_from_parts(parts, str(crude.get("__shard__", "")), key)
    cls = globals().get("ChatSample") or _chat_sample_class()
    return cls(**basic_sample_keys(crude), id=record["id"], messages=record["messages"],
               images=images, image_exts=exts)


def chat_cooker(has_subflavors: dict | None = None):
    """An energon ``Cooker`` for our shard folders (``TaskEncoder.cookers = [chat_cooker()]``)."""
    from megatron.energon import Cooker, stateless

    return Cooker(stateless(cook_chat), has_subflavors=has_subflavors)
