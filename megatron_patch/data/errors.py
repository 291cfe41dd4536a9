"""Typed errors of the data pipeline.

* ``SkipSample``     raised by per-sample code (encoder, reader) to drop one sample;
                     the loader counts it under ``.reason`` and moves on.
* ``BadSample``      a sample that cannot be read (corrupt tar member, bad JSON,
                     undecodable image); a ``SkipSample`` that also names the shard.
* ``DataQualityError`` too many bad samples: training must stop.
* ``ShardIndexError`` shard directory / index problems found before training.
"""
from megatron_patch.errors import UserError


class SkipSample(Exception):
    """Drop this sample; ``reason`` is a short stable name used as a counter key."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = str(reason)
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class BadSample(SkipSample):
    """A sample whose stored bytes are unusable; ``shard`` and ``key`` locate it."""

    def __init__(self, reason: str, shard: str = "", key: str = "", detail: str = ""):
        self.shard = shard
        self.key = key
        where = f"{shard}:{key}" if shard or key else ""
        super().__init__(reason, " ".join(p for p in (where, detail) if p))


class DataQualityError(UserError, RuntimeError):
    """The fraction of bad samples exceeded ``--max-bad-sample-fraction``."""


class ShardIndexError(RuntimeError):
    """A shard directory is missing, empty or its index is inconsistent."""
