"""Sequence packing (``--pack-sequences``): several encoded samples per ``seq_length`` row.

A packed sequence concatenates its samples' tokens, labels, loss masks and vision inputs (in
sample order); position ids restart at 0 for each sample, and ``seq_lens`` records the sample
lengths, from which ``collate`` builds ``cu_seqlens`` so that attention never crosses samples
(the model builds its attention segments from them). Labels were shifted per sample by the
encoder, so no sample's last position is trained to predict the next sample's first token.

Bin packing is first-fit-decreasing over a buffer of samples. The least-filled bin of each round
goes back into the buffer to meet the next round's samples (at most ``max_carry`` times per
sample), which keeps the padding of a lognormal length mix well under 5%
(``tests/data/test_collate_packing.py``). The output is a pure function of the input order.

``ResumablePacker`` is the loader's packer: it packs one data-parallel rank's ``(position, sample)``
stream into micro-batches and can save and restore what it holds as sampler positions only.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity``, longest first (stable)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a sequence of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack(samples: Sequence[dict]) -> dict:
    """One packed sequence from encoder outputs, in the given order."""
    cat = lambda key: torch.cat([s[key] for s in samples])  # noqa: E731
    pixel_values = [img for s in samples for img in s["pixel_values"]]
    return {
        "ids": [s.get("id", "?") for s in samples],
        "tokens": cat("tokens"),
        "labels": cat("labels"),
        "loss_mask": cat("loss_mask"),
        "position_ids": torch.cat([torch.arange(len(s["tokens"]), dtype=torch.int64) for s in samples]),
        "pixel_values": pixel_values,
        "num_images": len(pixel_values),
        "seq_lens": [len(s["tokens"]) for s in samples],
    }


def empty_row() -> dict:
    """A packed sequence of no sample: all padding (tops up the last micro-batch of a finite run)."""
    none = torch.zeros(0, dtype=torch.int64)
    return {"ids": [], "tokens": none, "labels": none, "loss_mask": torch.zeros(0), "position_ids": none,
            "pixel_values": [], "num_images": 0, "seq_lens": []}


def _num_tokens(sample: dict) -> int:
    return len(sample["tokens"])


class SequencePacker:
    """Streaming packer: ``push`` samples, get packed sequences as buffers fill; ``flush`` at the end.

    ``length`` measures an item and ``make_row`` turns a bin of items (in arrival order) into the
    output; the defaults pack encoder outputs with ``pack``.
    """

    def __init__(self, seq_length: int, buffer_size: int = 256, max_carry: int = 4,
                 length: Callable = _num_tokens, make_row: Callable = pack):
        if buffer_size < 1:
            raise ValueError(f"--pack-buffer-size must be >= 1, got {buffer_size}")
        self.seq_length, self.buffer_size, self.max_carry = int(seq_length), int(buffer_size), int(max_carry)
        self.length, self.make_row = length, make_row
        self._buffer: list[tuple[object, int]] = []  # (item, times carried over)

    @property
    def buffered(self) -> list[tuple[object, int]]:
        """``(item, times carried over)`` waiting for the next round, in buffer order."""
        return list(self._buffer)

    def restore(self, buffered: Iterable[tuple[object, int]]) -> None:
        """Put back what ``buffered`` returned (e.g. after a restart)."""
        self._buffer = [(item, int(carried)) for item, carried in buffered]

    def push(self, sample) -> list:
        self._buffer.append((sample, 0))
        return self._round(final=False) if len(self._buffer) >= self.buffer_size else []

    def flush(self) -> list:
        return self._round(final=True) if self._buffer else []

    def _round(self, final: bool) -> list:
        buffer, self._buffer = self._buffer, []
        lengths = [self.length(item) for item, _ in buffer]
        bins = first_fit_decreasing(lengths, self.seq_length)
        if not final and len(bins) > 1:
            fill = [sum(lengths[i] for i in b) for b in bins]
            emptiest = min(range(len(bins)), key=lambda b: (fill[b], b))
            if all(buffer[i][1] < self.max_carry for i in bins[emptiest]):
                self._buffer = [(buffer[i][0], buffer[i][1] + 1) for i in sorted(bins[emptiest])]
                bins = bins[:emptiest] + bins[emptiest + 1:]
        # Samples keep their arrival order inside a sequence (deterministic, readable).
        return [self.make_row([buffer[i][0] for i in sorted(b)]) for b in bins]

    def pack_stream(self, samples: Iterable) -> Iterator:
        for sample in samples:
            yield from self.push(sample)
        yield from self.flush()


def _item_tokens(item: tuple[int, dict]) -> int:
    return len(item[1]["tokens"])


class ResumablePacker:
    """Packs one data-parallel rank's ``(position, sample)`` stream into micro-batches of packed rows.

    ``state_dict`` holds sampler positions only: the samples waiting in the packer's buffer with
    their carry-over counts, and the rows packed but not yet handed out. ``load_state_dict`` gets
    the samples back through ``load(position)``; the loader re-reads and re-encodes them, which
    gives the same tensors because encoding is seeded by position.
    """

    def __init__(self, seq_length: int, buffer_size: int, rows_per_batch: int, max_carry: int = 4):
        self.packer = SequencePacker(seq_length, buffer_size, max_carry, length=_item_tokens, make_row=list)
        self.rows_per_batch = int(rows_per_batch)
        self.rows: list[list[tuple[int, dict]]] = []  # packed, not yet handed out

    def push(self, position: int, sample: dict) -> None:
        self.rows.extend(self.packer.push((position, sample)))

    def flush(self) -> None:
        self.rows.extend(self.packer.flush())

    def pop_batch(self, final: bool = False) -> list[dict]:
        """The next micro-batch's packed rows, [] while fewer are ready; ``final`` tops up a short one."""
        if not self.rows or (len(self.rows) < self.rows_per_batch and not final):
            return []
        take, self.rows = self.rows[: self.rows_per_batch], self.rows[self.rows_per_batch:]
        rows = [pack([sample for _, sample in row]) for row in take]
        return rows + [empty_row() for _ in range(self.rows_per_batch - len(rows))]

    def _settings(self) -> dict:
        p = self.packer
        return {"seq_length": p.seq_length, "buffer_size": p.buffer_size, "max_carry": p.max_carry}

    def state_dict(self) -> dict:
        return {**self._settings(),
                "buffer": [[position, carried] for (position, _), carried in self.packer.buffered],
                "rows": [[position for position, _ in row] for row in self.rows]}

    def load_state_dict(self, state: dict | None, load: Callable[[int], dict]) -> None:
        """Restore ``state_dict()``'s contents, getting each sample by ``load(position)``; None: empty."""
        state = state or {**self._settings(), "buffer": [], "rows": []}
        for key, now in self._settings().items():
            # Another capacity or buffer size packs differently: the restart could not be exact.
            if state[key] != now:
                raise ValueError(f"packing state was saved with {key}={state[key]}, this loader has {now}; resume with the same setting")
        self.packer.restore(((int(p), load(int(p))), carried) for p, carried in state["buffer"])
        self.rows = [[(int(p), load(int(p))) for p in row] for row in state["rows"]]

