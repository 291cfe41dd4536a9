"""Training / validation data loader: resumable sampler -> workers -> read -> decode -> encode -> collate.

::

    loader = ResumableLoader(["/data/shards/a", "/data/shards/b"], weights=[0.7, 0.3],
                             encode=encode, collate=collate, micro_batch_size=2, seed=1234,
                             dp_rank=rank, dp_size=world, consumed_samples=ckpt_consumed,
                             num_workers=2)
    for batch in loader:              # infinite unless total_samples is given
        ...                           # batch = collate(...); loader.snapshot(): the counters
        state = loader.state_dict()   # per DP rank, for checkpoints (see "State" below)

* The order and the DP slicing come from ``sampler`` (read its docstring for the
  ``consumed_samples`` and substitute conventions). Unpacked, one micro-batch = one sampler item =
  one call of ``_MicroBatchReader[slots]`` in one worker; torch's DataLoader returns
  batches in sampler order, so the result does not depend on ``num_workers``.
* Randomness inside ``encode`` is seeded per sample from (seed, position), and the caller's
  RNG states are restored afterwards, so augmentations are the same on any worker count.
* Per-sample failures (``BadSample`` from reading, undecodable images, ``SkipSample`` from
  ``encode``) are counted by reason and shard, the slot falls back to its next substitute.
  Only damaged data (``BadSample``) is "bad"; the encoder's policy skips are counted as
  "skipped". When bad / seen exceeds ``max_bad_sample_fraction`` (after
  ``min_samples_before_check`` reads), ``DataQualityError`` names the shard with the most bad samples.
* ``consumed_samples`` counts sampler positions (all DP ranks together, Megatron's meaning) whose
  samples the main process has received, not the ones workers prefetch (``prefetched_samples``).

Worker transport: what a worker returns goes through ``worker_transport.to_wire`` (large arrays
by shared memory, small ones through the pipe) and back through ``from_wire`` in the main process.

Packing (``pack_seq_length``, ``--pack-sequences``)
---------------------------------------------------
Workers still read, decode and encode one sampler item (``micro_batch_size`` slots) at a time,
but return the encoded samples with their positions instead of a batch. The main process feeds
them, in sampler order, to a ``ResumablePacker`` (first-fit-decreasing with carry-over) and
collates every ``micro_batch_size`` packed rows into one ``[B, pack_seq_length]`` micro-batch.
Each DP rank packs its own slice, so ranks may yield different numbers of micro-batches per
sample drawn. A finite run (``total_samples``) ends with a micro-batch topped up with empty rows.

State (``state_dict``; one per DP rank)
---------------------------------------
``consumed_samples``: the global position where this rank's next sampler step starts.
``stats``: the counters of ``snapshot``. With packing also ``packing``: ``dp_rank``, ``dp_size``,
the packer's settings, ``buffer`` (``[position, times carried over]`` of the samples waiting in
the packer) and ``rows`` (positions of each row packed but not yet yielded). ``load_state_dict``
re-reads and re-encodes those samples (encoding is seeded by position), so the resumed loader
yields exactly the micro-batches an uninterrupted run would have; that needs the same DP size
and packing settings. Without ``load_state_dict``, a packed run started from ``consumed_samples``
alone skips what sat in the packer.
"""
from __future__ import annotations

import functools
import io
import random
import warnings
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from megatron_patch.data.errors import BadSample, DataQualityError, SkipSample
from megatron_patch.data.collate import empty_sample
from megatron_patch.data.packing import ResumablePacker
from megatron_patch.data.sampler import DistributedSampler, GlobalOrder, mix64
from megatron_patch.data.datasets import open_dataset
from megatron_patch.data.settings import DataSettings
from megatron_patch.data.worker_transport import from_wire, to_wire

UNDECODABLE_IMAGE = "undecodable_image"
_TAG_WORKER, _TAG_SAMPLE = 0x776B, 0x736D


def decode_image(blob: bytes, shard: str, key: str, i: int) -> Image.Image:
    """Fully decode image bytes; ``BadSample(undecodable_image)`` when PIL cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(blob))
            image.load()
        return image
    except Exception as exc:  # PIL raises many types for bad bytes
        raise BadSample(UNDECODABLE_IMAGE, shard, f"{key}.{i}", str(exc)) from exc


def _seed_host_rngs(seed: int) -> None:
    """Seed python, numpy and torch CPU RNGs (data-local; project-wide: platform.seeding.set_seed)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _worker_init(worker_id: int, seed: int, dp_rank: int) -> None:
    _seed_host_rngs(mix64(seed, _TAG_WORKER, dp_rank, worker_id) % (1 << 63))


def _identity(batch):
    return batch


class _SampleRng:
    """Seed the global RNGs for one sample, restore the caller's states afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        _seed_host_rngs(self.seed)

    def __exit__(self, *exc):
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])


class _MicroBatchReader(torch.utils.data.Dataset):
    """``reader[slots]`` -> ``{"batch": collated micro-batch, "stats": this read's counters}``.

    With ``collate=None`` (packing) it returns ``{"samples": [(position, sample), ...], "stats"}``.
    In a DataLoader worker the result goes through ``to_wire`` (unless ``wire`` is False).
    """

    def __init__(self, datasets, encode, collate, seed, wire: bool = True):
        self.datasets, self.encode, self.collate, self.seed = datasets, encode, collate, seed
        self.wire = wire

    def __getitem__(self, slots: Sequence[tuple]):
        item = self.read(slots)
        if self.wire and torch.utils.data.get_worker_info() is not None:
            return to_wire(item)
        return item

    def load(self, position: int, ds: int, idx: int) -> dict:
        raw = self.datasets[ds].read(idx)
        images = [decode_image(b, raw.shard, raw.key, i) for i, b in enumerate(raw.images)]
        with _SampleRng(mix64(self.seed, _TAG_SAMPLE, position) % (1 << 63)):
            try:
                return self.encode(raw.record, images)
            except SkipSample as exc:
                # The encoder's own skips (too long, nothing to train on) are policy, not damaged
                # data: located and counted, but kept out of the bad-sample fraction.
                if not isinstance(exc, BadSample):
                    exc.shard = raw.shard
                raise

    def read(self, slots: Sequence[tuple]) -> dict:
        samples, reasons, shards = [], Counter(), Counter()
        seen = bad = substituted = dropped = 0
        empty = 0  # slots past the end of a finite set (validation tail): all-pad rows, not data loss
        for slot in slots:
            if not slot:
                empty += 1
                continue
            for attempt, (position, ds, idx) in enumerate(slot):
                seen += 1
                try:
                    samples.append((position, self.load(position, ds, idx)))
                except SkipSample as exc:
                    reasons[exc.reason] += 1
                    if isinstance(exc, BadSample):
                        bad += 1
                        shards[exc.shard or self.datasets[ds].locate(idx)[0]] += 1
                    continue
                substituted += attempt > 0
                break
            else:
                dropped += 1
        if not samples and not empty:
            worst = shards.most_common(1)[0][0] if shards else "?"
            raise DataQualityError(f"no usable sample for the micro-batch at position "
                                   f"{slots[0][0][0]} (all substitutes failed; most in shard {worst})")
        stats = {"seen": seen, "bad": bad, "skipped": sum(reasons.values()) - bad, "substituted": substituted,
                 "dropped": dropped, "by_reason": dict(reasons), "by_shard": dict(shards)}
        if self.collate is None:  # packing: the main process packs and collates, in sampler order
            return {"samples": samples, "stats": stats}
        # A micro-batch keeps its [micro_batch_size, seq_length] shape: a slot whose sample and all
        # substitutes failed (counted in "dropped"), or past the end of the set, is an all-pad row.
        rows = [s for _, s in samples] + [empty_sample() for _ in range(len(slots) - len(samples))]
        return {"batch": _collated(self.collate, rows), "stats": stats}


def _collated(collate: Callable, samples: list) -> dict:
    batch = collate(samples)
    if not isinstance(batch, dict):
        raise TypeError(f"collate must return a dict, got {type(batch).__name__}")
    return batch


class ResumableLoader:
    """Iterable of micro-batches for one data-parallel rank; restartable at any consumed_samples."""

    def __init__(self, datasets: Sequence, weights: Sequence[float] | None = None, *,
                 encode: Callable, collate: Callable, micro_batch_size: int, seed: int = 1234,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                 total_samples: int | None = None, num_workers: int = 0, prefetch_factor: int = 2,
                 shuffle: bool = True, max_bad_sample_fraction: float = 0.01,
                 min_samples_before_check: int = 100, num_substitutes: int = 3,
                 pack_seq_length: int | None = None, pack_buffer_size: int = 256, keep_tail: bool = False,
                 worker_wire: bool = True):
        """``pack_seq_length``: pack samples into rows of this many tokens (None: no packing);
        ``pack_buffer_size``: samples per first-fit-decreasing round; ``keep_tail``: with
        ``total_samples``, the last partial step too, topped up with all-pad rows (validation);
        ``worker_wire``: False hands workers' results to torch's pickler as they are (the
        transport before ``to_wire``; for the benchmark)."""
        if not 0 <= max_bad_sample_fraction <= 1:
            raise ValueError(f"--max-bad-sample-fraction must be in [0, 1], got {max_bad_sample_fraction}")
        if num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
        self.datasets = [open_dataset(d) for d in datasets]  # our shards, energon-prepared folders, URLs
        self.order = GlobalOrder([len(d) for d in self.datasets], weights, seed, shuffle)
        self.collate = collate
        self.reader = _MicroBatchReader(self.datasets, encode, None if pack_seq_length else collate, seed,
                                        wire=worker_wire)
        self.packer = None if pack_seq_length is None else \
            ResumablePacker(pack_seq_length, pack_buffer_size, micro_batch_size)
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.micro_batch_size, self.total_samples = micro_batch_size, total_samples
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.max_bad_sample_fraction = max_bad_sample_fraction
        self.min_samples_before_check = min_samples_before_check
        self.num_substitutes = num_substitutes
        self.keep_tail = keep_tail
        self.consumed_samples = consumed_samples
        self.stats = {"seen": 0, "bad": 0, "skipped": 0, "substituted": 0, "dropped": 0,
                      "by_reason": Counter(), "by_shard": Counter()}
        self._live_sampler = self._sampler()  # validate rank / sizes now, not at first iteration

    def _sampler(self) -> DistributedSampler:
        return DistributedSampler(self.order, self.micro_batch_size, self.dp_rank, self.dp_size,
                                  self.consumed_samples, self.total_samples, self.num_substitutes,
                                  self.keep_tail)

    def num_steps(self) -> int | None:
        """Micro-batches left to yield when unpacked and finite (None: endless)."""
        return self._sampler().num_steps()

    def _dataloader(self, sampler: DistributedSampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.reader, batch_size=None, sampler=sampler, collate_fn=_identity,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            worker_init_fn=functools.partial(_worker_init, seed=self.seed, dp_rank=self.dp_rank),
            # Own generator: building the iterator must not draw from the global torch RNG.
            generator=torch.Generator().manual_seed(self.seed))

    @property
    def prefetched_samples(self) -> int:
        """Positions the workers were given beyond ``consumed_samples`` (the read-ahead)."""
        return self._live_sampler.drawn_until - self.consumed_samples

    def __iter__(self):
        sampler = self._live_sampler = self._sampler()
        items = self._dataloader(sampler)
        if self.num_workers and self.reader.wire:
            items = map(from_wire, items)
        yield from (self._unpacked(items, sampler) if self.packer is None else self._packed(items, sampler))

    def _unpacked(self, items, sampler):
        for item in items:
            self._receive(item["stats"], sampler)
            yield item["batch"]

    def _packed(self, items, sampler):
        yield from self._emit()  # rows packed before a restart come first
        for item in items:
            self._receive(item["stats"], sampler)
            for position, sample in item["samples"]:
                self.packer.push(position, sample)
            yield from self._emit()
        self.packer.flush()  # the sampler is exhausted (total_samples): pack what is left
        yield from self._emit(final=True)

    def _emit(self, final: bool = False):
        while rows := self.packer.pop_batch(final):
            yield _collated(self.collate, rows)

    def _receive(self, delta: dict, sampler: DistributedSampler) -> None:
        self._account(delta)
        self.consumed_samples += sampler.step_size
        if self.total_samples is not None:  # a kept tail step ends the set, not beyond it
            self.consumed_samples = min(self.consumed_samples, self.total_samples)

    def _account(self, delta: dict) -> None:
        s = self.stats
        for k in ("seen", "bad", "skipped", "substituted", "dropped"):
            s[k] += delta[k]
        s["by_reason"].update(delta["by_reason"])
        s["by_shard"].update(delta["by_shard"])
        if s["seen"] >= self.min_samples_before_check and \
                s["bad"] > self.max_bad_sample_fraction * s["seen"]:
            shard, n = s["by_shard"].most_common(1)[0]
            raise DataQualityError(
                f"{s['bad']}/{s['seen']} samples bad ({s['bad'] / s['seen']:.1%} > "
                f"--max-bad-sample-fraction {self.max_bad_sample_fraction:.1%}) on dp rank "
                f"{self.dp_rank}; worst shard {shard} ({n} bad); reasons {dict(s['by_reason'])}")

    def snapshot(self) -> dict:
        """Cumulative counters for logging (this rank, since construction / load_state_dict)."""
        s = self.stats
        return {"seen": s["seen"], "bad": s["bad"], "skipped": s["skipped"], "substituted": s["substituted"],
                "dropped": s["dropped"], "bad_fraction": s["bad"] / max(s["seen"], 1),
                "by_reason": dict(s["by_reason"]), "consumed_samples": self.consumed_samples}

    def state_dict(self) -> dict:
        """This rank's position, counters and (packing) packer contents; see the module docstring."""
        state = {"consumed_samples": self.consumed_samples,
                 "stats": {**self.stats, "by_reason": dict(self.stats["by_reason"]),
                           "by_shard": dict(self.stats["by_shard"])}}
        if self.packer is not None:
            state["packing"] = {"dp_rank": self.dp_rank, "dp_size": self.dp_size, **self.packer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        packing = state.get("packing")
        if packing and self.packer is None:
            raise ValueError("the loader state holds a packer's contents; resume with --pack-sequences")
        if packing and (packing["dp_rank"], packing["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(f"packing state of dp rank {packing['dp_rank']} of {packing['dp_size']} cannot resume "
                             f"on dp rank {self.dp_rank} of {self.dp_size}: each rank packs its own slice")
        self.consumed_samples = int(state["consumed_samples"])
        stats = state.get("stats")
        if stats:
            self.stats = {**stats, "by_reason": Counter(stats["by_reason"]),
                          "by_shard": Counter(stats["by_shard"])}
        self._live_sampler = self._sampler()  # validate before re-encoding the packer's samples
        if self.packer is not None:
            self.packer.load_state_dict(packing, self._reload)

    def _reload(self, position: int) -> dict:
        """The encoded sample at ``position`` again (restoring the packer)."""
        ds, idx = (int(a[0]) for a in self.order.lookup([position]))
        try:
            return self.reader.load(position, ds, idx)
        except SkipSample as exc:
            raise DataQualityError(f"cannot restore the packer: the sample at position {position} "
                                   f"({self.datasets[ds].locate(idx)[0]}) now fails ({exc.reason}); did the shards change?") from exc


def add_data_arguments(parser):
    """Register the loader's Megatron-style flags (for entry points that do not define them)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="+",
                       help="shard datasets, optionally weighted: 0.7 dirA 0.3 dirB; each a folder, file:///abs, "
                            "an fsspec URL (s3://bucket/prefix) or 'pipe:CMD {name}' (docs/data.md)")
    group.add_argument("--valid-data-path", nargs="+", default=None)
    group.add_argument("--num-workers", type=int, default=2)
    group.add_argument("--max-bad-sample-fraction", type=float, default=0.01)
    group.add_argument("--pack-sequences", action="store_true",
                       help="pack several samples per --seq-length sequence (exact resume needs the loader state)")
    group.add_argument("--pack-buffer-size", type=int, default=256, help="samples per first-fit-decreasing round")
    return parser


def build_train_valid_loaders(settings: DataSettings, encode: Callable, collate: Callable, dp_rank: int,
                              dp_size: int, consumed_samples: int = 0):
    """(train, valid or None) loaders from ``settings`` (``settings.py``); the training loader starts
    at ``consumed_samples`` (a resumed run's).

    With packing, restore each rank's ``state_dict`` too for an exact resume. The validation loader
    covers its whole set once, in stored order, unpacked (packing changes no per-token loss), its
    last micro-batch topped up with all-pad rows; ``valid.num_steps()`` is the same on every rank.
    """
    from megatron_patch.data.sampler import parse_data_path

    common = dict(encode=encode, collate=collate, micro_batch_size=settings.micro_batch_size,
                  seed=settings.seed, dp_rank=dp_rank, dp_size=dp_size, num_workers=settings.num_workers,
                  max_bad_sample_fraction=settings.max_bad_sample_fraction)
    train = None
    if settings.data_path:
        dirs, weights = parse_data_path(settings.data_path, "--data-path")
        train = ResumableLoader(dirs, weights, shuffle=True, consumed_samples=consumed_samples,
                                total_samples=settings.train_samples,
                                pack_seq_length=settings.seq_length if settings.pack_sequences else None,
                                pack_buffer_size=settings.pack_buffer_size, **common)
    valid = None
    if settings.valid_data_path:
        dirs, weights = parse_data_path(settings.valid_data_path, "--valid-data-path")
        datasets = [open_dataset(d) for d in dirs]
        valid = ResumableLoader(datasets, weights, shuffle=False, keep_tail=True,
                                total_samples=sum(len(d) for d in datasets), **common)
    return train, valid
