"""Bytes of weights, gradients and optimizer state one rank keeps, as megatron-core 0.16.1 lays them out.

Per trainable parameter element (Megatron-LM's docs/distrib_optimizer.md table; DP = data-parallel size):

    precision                       weights  grads (main_grad)  optimizer                    total
    bf16 (--bf16, fp32 grads)          2          4           4 main param + 8 Adam = 12     18   (6 + 12/DP distributed)
    fp32                               4          4           8 Adam (the params are main)   16   (8 + 8/DP distributed)

Frozen parameters (`--freeze-*`) have weights only. The project turns on fp32 grad accumulation with
--bf16 (`--accumulate-allreduce-grads-in-fp32`, as Megatron-LM does), so gradients are fp32 either way.

The layout is megatron-core's own (`distributed/param_and_grad_buffer.py`): DDP puts the trainable
parameters, in reverse `named_parameters` order, into one contiguous gradient buffer (one bucket
without --overlap-grad-reduce). With the distributed optimizer each parameter starts at a multiple of
64 elements, a tied embedding gets a bucket of its own, each bucket ends at a multiple of lcm(DP, 128)
and the weights move into a parameter buffer of the same padded size; each DP rank then holds the
fp32 main params and Adam moments of its 1/DP slice of every bucket only (padding has none).
Adam's per-parameter `step` counters (a scalar each) are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_patch.planning.census import RankParams

GRAD_BYTES = 4
MAIN_PARAM_BYTES = 4
ADAM_MOMENT_BYTES = 2 * 4


def buckets(trainable: list, dp: int, distributed: bool) -> list[list[tuple[int, int]]]:
    """Buckets of the gradient buffer: per bucket, the (start, end) element range of each parameter
    relative to the bucket start, and the bucket's padded size as a last (size, size) entry."""
    if not trainable:
        return []
    out, current, start = [], [], 0

    def close(end: int) -> int:
        size = end - start
        if distributed:
            size = math.ceil(size / math.lcm(dp, 128)) * math.lcm(dp, 128)
        out.append(current + [(size, size)])
        return start + size

    index = 0
    for numel, shared in reversed(trainable):
        if distributed:
            index = math.ceil(index / 64) * 64
        if distributed and shared and current:
            index = start = close(index)
            current = []
        current.append((index - start, index - start + numel))
        index += numel
        if distributed and shared:
            index = start = close(index)
            current = []
    if current:
        close(index)
    return out


@dataclass(frozen=True)
class StateBytes:
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def state_bytes(rank: RankParams, dp: int, bf16: bool, distributed: bool, dp_rank: int | None = None) -> StateBytes:
    """Weights + gradients + optimizer state of one rank of part `rank` at data-parallel size `dp`.

    With the distributed optimizer the DP ranks' slices differ by a few padding elements; `dp_rank`
    picks one, None takes the largest."""
    per_element_optimizer = (MAIN_PARAM_BYTES if bf16 else 0) + ADAM_MOMENT_BYTES
    trainable = rank.trainable_total
    frozen_bytes = rank.param_bytes - trainable * rank.param_itemsize
    if not distributed:
        return StateBytes(rank.param_bytes, trainable * GRAD_BYTES, trainable * per_element_optimizer)
    layout = buckets(rank.trainable, dp, distributed=True)
    buffer = sum(b[-1][0] for b in layout)
    shard = max(_shard_elements(layout, dp, d) for d in range(dp)) if dp_rank is None else _shard_elements(layout, dp, dp_rank)
    return StateBytes(frozen_bytes + buffer * rank.param_itemsize, buffer * GRAD_BYTES, shard * per_element_optimizer)


def _shard_elements(layout, dp: int, dp_rank: int) -> int:
    """Parameter elements inside DP rank `dp_rank`'s 1/DP slice of every bucket."""
    total = 0
    for bucket in layout:
        size = bucket[-1][0] // dp
        lo, hi = dp_rank * size, (dp_rank + 1) * size
        total += sum(max(0, min(end, hi) - max(start, lo)) for start, end in bucket[:-1])
    return total
