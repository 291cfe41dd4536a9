"""Resumable global sample order over a blend of datasets, sliced over data-parallel ranks.

Global order
------------
A *position* p = 0, 1, 2, ... counts samples across the whole run; epoch e = p // L where
L (``epoch_length``) = total number of samples over all datasets. What sits at p is a pure
function of (seed, epoch, p):

* Blend: dataset d gets a fixed quota q_d of the L slots of every epoch (largest-remainder
  rounding of w_d * L; without weights w_d is proportional to its size, so q_d = n_d and an
  epoch visits every sample exactly once, Megatron's unweighted behaviour). Dataset d owns
  the layout slots [start_d, start_d + q_d) (cumulative quotas); offset t = p % L of epoch e
  sits on slot u = P_layout(seed, e)(t), a keyed bijection of [0, L), so each epoch holds
  exactly q_d slots of d, scattered.
* Within dataset d, slot u is draw number k = e * q_d + (u - start_d) (k counted over all
  epochs) and draws ``P_perm(seed, d, k // n_d)(k % n_d)``: a fresh keyed bijection of
  [0, n_d) per pass over d. A pass is complete once all its k are drawn; when q_d is not a
  multiple of n_d a pass straddles epochs, and inside an epoch the draws come in layout
  order, not in k order.
* ``shuffle=False`` (validation) keeps datasets concatenated in stored order (both
  bijections are the identity).
* Memory: no array of epoch size is ever built. The bijections are Feistel networks with
  cycle-walking (``permutation.py``), evaluated on demand from (key, index); the object holds
  O(number of datasets) numbers, and a lookup of B positions costs O(B) time and memory
  (one vectorised call for the layout, one per dataset for the draws).

Data-parallel slicing (Megatron's ``MegatronPretrainingSampler`` convention)
--------------------------------------------------------------------------
``consumed_samples`` is global. Each micro-batch step covers the next G = mbs * dp_size
positions [c, c + G); rank r takes [c + r * mbs, c + (r + 1) * mbs); then c += G. The
global sequence never depends on dp_size or on loader workers, so a run may resume from
any ``consumed_samples`` with another dp_size and the ranks together continue exactly
where the previous run stopped.

Substitutes (how skipped samples keep the order resumable)
----------------------------------------------------------
A slot's sample may turn out unusable (corrupt bytes, ``SkipSample`` from the encoder).
Filling the batch from "the next positions" would make each rank's consumption depend on
what the other ranks skipped, so a single global ``consumed_samples`` could not restore it.
Instead every slot carries ``1 + num_substitutes`` candidates: its own position, then
substitute positions drawn by hashing (seed, p, attempt) into p's epoch. The loader uses the
first candidate that works. Positions, not samples, are consumed: a step always advances
``consumed_samples`` by G, and what fills each slot is a pure function of (seed, p), so a
resumed run repeats the uninterrupted one exactly, with skips, on any worker count.
The price: a substitute may repeat a sample of the same epoch (at most the bad fraction).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from megatron_patch.data.permutation import permute, splitmix_step

_TAG_LAYOUT, _TAG_PERM, _TAG_SUB = 0x6C61, 0x7065, 0x7375  # keep the RNG streams apart
_MASK64 = (1 << 64) - 1


def parse_data_path(items: list[str], flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """Megatron-style ``[w1 dir1 w2 dir2 ...]`` or ``[dir1 dir2 ...]`` -> (dirs, weights or None)."""
    items = [str(i) for i in items]
    if not items:
        raise ValueError(f"{flag} is empty")

    def as_float(s):
        try:
            return float(s)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(as_float(w) is not None for w in items[0::2]):
        weights, dirs = [float(w) for w in items[0::2]], items[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"{flag}: blend weights must be >= 0 and not all 0, got {weights}")
        return dirs, weights
    if any(as_float(i) is not None for i in items):
        raise ValueError(f"{flag}: give either 'dir ...' or 'weight dir weight dir ...', got {items}")
    return items, None


def blend_quotas(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Slots per epoch for each dataset; they sum to ``sum(sizes)``."""
    total = sum(sizes)
    if weights is None:
        return list(sizes)
    if len(weights) != len(sizes):
        raise ValueError(f"{len(weights)} blend weights for {len(sizes)} datasets")
    for n, w in zip(sizes, weights):
        if n == 0 and w > 0:
            raise ValueError("a dataset with blend weight > 0 has no samples")
    share = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    quotas = np.floor(share).astype(np.int64)
    # Largest remainder; ties go to the lower dataset index (stable sort).
    order = np.argsort(-(share - quotas), kind="stable")
    quotas[order[: total - int(quotas.sum())]] += 1
    return [int(q) for q in quotas]


def mix64(*values: int) -> int:
    """Deterministic 64-bit hash of integers (splitmix64 chain); used for all derived seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


class GlobalOrder:
    """Maps global positions to (dataset index, sample index) for a blend of datasets.

    Holds O(number of datasets) state; every lookup is computed from (seed, position).
    """

    def __init__(self, sizes: list[int], weights: list[float] | None = None, seed: int = 1234,
                 shuffle: bool = True):
        if not sizes or sum(sizes) == 0 or any(n < 0 for n in sizes):
            raise ValueError(f"dataset sizes must be >= 0 with at least one sample, got {sizes}")
        if seed < 0:
            raise ValueError(f"--seed must be >= 0, got {seed}")
        self.sizes = [int(n) for n in sizes]
        self.quotas = blend_quotas(self.sizes, weights)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch_length = sum(self.sizes)
        # Dataset d owns the layout slots [starts[d], ends[d]) of every epoch.
        self._ends = np.cumsum(np.asarray(self.quotas, dtype=np.int64))
        self._starts = self._ends - np.asarray(self.quotas, dtype=np.int64)
        self._quotas = np.asarray(self.quotas, dtype=np.int64)
        self._sizes = np.asarray(self.sizes, dtype=np.int64)
        # State of the substitute hash after (seed, tag): only (p, attempt) vary per call.
        self._sub_state = mix64(self.seed, _TAG_SUB)

    def _layout(self, epochs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Layout slot u in [0, L) of each (epoch, offset): a keyed bijection of [0, L) per epoch."""
        if not self.shuffle:
            return offsets
        return permute(self.epoch_length, _keys(mix64(self.seed, _TAG_LAYOUT), epochs), offsets)

    def _draws(self, ds: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Sample index of draw number k (over all epochs) of dataset ds: a bijection per pass k // n_d."""
        cycles, offsets = np.divmod(k, self._sizes[ds])
        if not self.shuffle:
            return offsets
        out = np.empty_like(k)
        for d in np.unique(ds).tolist():  # one vectorised call per dataset, whatever the passes
            sel = ds == d
            keys = _keys(mix64(self.seed, _TAG_PERM, d), cycles[sel])
            out[sel] = permute(self.sizes[d], keys, offsets[sel])
        return out

    def lookup(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Global positions (any epochs) -> (dataset ids, sample ids)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError("positions must be >= 0")
        flat = positions.ravel()
        epochs, offsets = np.divmod(flat, self.epoch_length)
        slots = self._layout(epochs, offsets)
        # side="right" skips datasets with a zero quota (their range is empty).
        ds = np.searchsorted(self._ends, slots, side="right").astype(np.int64)
        k = epochs * self._quotas[ds] + (slots - self._starts[ds])
        idx = self._draws(ds, k)
        return ds.reshape(positions.shape), idx.reshape(positions.shape)

    def substitutes(self, positions, attempt: int) -> np.ndarray:
        """Substitute position number ``attempt`` (>= 1) for each position, in the same epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        L = self.epoch_length
        h = splitmix_step(splitmix_step(self._sub_state, positions), int(attempt))  # mix64(seed, tag, p, attempt)
        return ((positions // L) * L + (h % np.uint64(L)).astype(np.int64)).reshape(positions.shape)


def _keys(state: int, values: np.ndarray):
    """mix64(..., v) for each v, continuing the chain whose state is ``state``.

    A single int when all values agree (the common case: one epoch, one pass), so the
    permutation derives its round keys once instead of per element.
    """
    if values.size and (values == values.flat[0]).all():
        return int(splitmix_step(state, values.flat[0])[0])
    return splitmix_step(state, values)


class DistributedSampler:
    """Yields, for one data-parallel rank, the slots of each of its micro-batches.

    A slot is a tuple of candidates ``((position, dataset, sample), ...)``: the slot's own
    position first, then ``num_substitutes`` substitutes (see the module docstring).
    """

    def __init__(self, order: GlobalOrder, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, total_samples: int | None = None,
                 num_substitutes: int = 3, keep_tail: bool = False):
        """``keep_tail`` (finite runs, e.g. validation): also yield the last, partial step; its
        slots past ``total_samples`` are empty tuples (the loader turns them into all-pad rows)."""
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if total_samples is not None and consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} > total samples {total_samples}")
        self.order = order
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples
        self.num_substitutes = num_substitutes
        self.keep_tail = keep_tail
        self.drawn_until = consumed_samples  # global position after the last step handed out

    @property
    def step_size(self) -> int:
        """Positions consumed by one micro-batch step over all ranks (mbs * dp_size)."""
        return self.micro_batch_size * self.dp_size

    def slots(self, start: int) -> list[tuple]:
        """This rank's slots for the step that starts at global position ``start``."""
        own = start + self.dp_rank * self.micro_batch_size + np.arange(self.micro_batch_size)
        cands = [own] + [self.order.substitutes(own, a) for a in range(1, self.num_substitutes + 1)]
        flat = np.concatenate(cands)
        ds, idx = self.order.lookup(flat)
        rows = np.stack([flat, ds, idx], axis=1).reshape(len(cands), len(own), 3)
        return [tuple((int(p), int(d), int(i)) for p, d, i in rows[:, s])
                for s in range(len(own))]

    def num_steps(self) -> int | None:
        """Steps left from ``consumed_samples`` (None: endless); the same on every rank."""
        if self.total_samples is None:
            return None
        left = self.total_samples - self.consumed_samples
        return -(-left // self.step_size) if self.keep_tail else left // self.step_size

    def __iter__(self) -> Iterator[list[tuple]]:
        start = self.consumed_samples
        steps = self.num_steps()
        while steps is None or steps > 0:
            slots = self.slots(start)
            if self.total_samples is not None:
                first = start + self.dp_rank * self.micro_batch_size
                slots = [s if first + i < self.total_samples else () for i, s in enumerate(slots)]
            steps = None if steps is None else steps - 1
            start += self.step_size
            # How far the sampler has been read: a DataLoader reads ahead of what it has handed out.
            self.drawn_until = start
            yield slots
