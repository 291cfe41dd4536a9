"""Sequence packing (``--pack-sequences``): several encoded samples per ``seq_length`` row.

A packed sequence concatenates its samples' tokens, labels, loss masks and vision inputs (in
sample order); position ids restart at 0 for each sample, and ``seq_lens`` records the sample
lengths, from which ``collate`` builds ``cu_seqlens`` so that attention never crosses samples
(megatron-core THD format, see ``packed_seq_params``). Labels were shifted per sample by the
encoder, so no sample's last position is trained to predict the next sample's first token.

Bin packing is first-fit-decreasing over a buffer of samples. The least-filled bin of each round
goes back into the buffer to meet the next round's samples (at most ``max_carry`` times per
sample), which keeps the padding of a lognormal length mix well under 5%
(``tests/data/test_collate_packing.py``). The output is a pure function of the input order.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

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


class SequencePacker:
    """Streaming packer: ``push`` samples, get packed sequences as buffers fill; ``flush`` at the end."""

    def __init__(self, seq_length: int, buffer_size: int = 256, max_carry: int = 4):
        if buffer_size < 1:
            raise ValueError(f"packing buffer size must be >= 1, got {buffer_size}")
        self.seq_length, self.buffer_size, self.max_carry = int(seq_length), int(buffer_size), int(max_carry)
        self._buffer: list[tuple[dict, int]] = []  # (sample, times carried over)

    def push(self, sample: dict) -> list[dict]:
        self._buffer.append((sample, 0))
        return self._round(final=False) if len(self._buffer) >= self.buffer_size else []

    def flush(self) -> list[dict]:
        return self._round(final=True) if self._buffer else []

    def _round(self, final: bool) -> list[dict]:
        buffer, self._buffer = self._buffer, []
        bins = first_fit_decreasing([len(s["tokens"]) for s, _ in buffer], self.seq_length)
        if not final and len(bins) > 1:
            fill = [sum(len(buffer[i][0]["tokens"]) for i in b) for b in bins]
            emptiest = min(range(len(bins)), key=lambda b: (fill[b], b))
            if all(buffer[i][1] < self.max_carry for i in bins[emptiest]):
                self._buffer = [(buffer[i][0], buffer[i][1] + 1) for i in sorted(bins[emptiest])]
                bins = bins[:emptiest] + bins[emptiest + 1:]
        # Samples keep their arrival order inside a sequence (deterministic, readable).
        return [pack([buffer[i][0] for i in sorted(b)]) for b in bins]

    def pack_stream(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            yield from self.push(sample)
        yield from self.flush()


def packed_seq_params(batch: dict):
    """megatron-core ``PackedSeqParams`` (THD) for a collated packed batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"]
    max_len = int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)
