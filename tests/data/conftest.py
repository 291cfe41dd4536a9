"""Fixtures of the data tests (their helpers: corpora.py, encoder_fixtures.py)."""
import os

import pytest

from tests.data.corpora import build, good_corpus


@pytest.fixture(scope="session")
def shard_dirs(tmp_path_factory):
    """Two shard directories built by the tool: A (23 samples, 3 shards) and B (11 samples)."""
    root = tmp_path_factory.mktemp("shards")
    dirs = {}
    for name, n in (("A", 23), ("B", 11)):
        inp, img = good_corpus(str(root), name, n)
        out = os.path.join(str(root), f"{name}_shards")
        build(inp, img, out, samples_per_shard=8, workers=1)
        dirs[name] = out
    return dirs
