"""One entry point from a data location to a random-access dataset.

``open_dataset(location)`` picks the reader from what the folder holds:

* ``index.json`` (written by our shard builder) -> ``ShardedDataset``. This wins even when the
  folder also has ``.nv-meta/`` (``energon_prepare.py`` adds that for energon users; our own
  index reads the same samples without the sqlite).
* ``.nv-meta/`` and no ``index.json`` (a webdataset prepared by ``energon prepare``, e.g.
  Megatron-LM's LLaVA recipe) -> ``EnergonDataset`` of ``split_part``. Broken metadata is a
  one-line ``ShardIndexError`` naming the file.
* otherwise plain ``*.tar`` shards -> ``ShardedDataset`` (scanned once at start-up).

Both readers give ``len()``, ``num_samples``, ``read(index) -> RawSample`` and
``locate(index) -> (shard path, key)``. An already opened dataset is passed through; remote
locations (fsspec URLs, ``pipe:``) go to ``ShardedDataset`` as they are (our layout only there).
"""
from __future__ import annotations

import os

from megatron_patch.data.energon import EnergonDataset, is_energon_dir
from megatron_patch.data.errors import ShardIndexError
from megatron_patch.data.shards import INDEX_FILE, ShardedDataset
from megatron_patch.data.storage import LocalLocation, open_location


def open_dataset(location, split_part: str = "train") -> "ShardedDataset | EnergonDataset":
    """Dataset for a data location; ``split_part`` applies to energon-prepared folders only."""
    if hasattr(location, "read") and hasattr(location, "locate"):
        return location  # already opened
    url = os.fspath(location)
    where = open_location(url)
    if not isinstance(where, LocalLocation):  # fsspec URL or pipe: only our own layout there
        return ShardedDataset(url)
    folder = where.url
    if not os.path.isdir(folder):
        raise ShardIndexError(f"data path {url} is not a directory")
    if not os.path.exists(os.path.join(folder, INDEX_FILE)) and is_energon_dir(folder):
        return EnergonDataset(folder, split_part)
    return ShardedDataset(url)

