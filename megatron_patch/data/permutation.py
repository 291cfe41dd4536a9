"""Keyed bijections on [0, n), evaluated on demand: a shuffle that never materialises.

Why: the global sample order needs "the i-th element of a seeded permutation of n items" for
n up to 10^9 and beyond. ``rng.permutation(n)`` costs 8 n bytes per pass; here the i-th
element is computed from (n, key, i) alone, in O(1) memory, vectorised over numpy arrays.

Construction
------------
* A balanced Feistel network on 2h-bit words, 2h the smallest even width with 2^(2h) >= n:
  split x into halves (left, right) of h bits; each round maps (l, r) -> (r, l ^ F_j(r)),
  which is invertible whatever F_j is: (l, r) = (r' ^ F_j(l'), l'). F_j is a 64-bit
  splitmix-style hash of (round key j, r), truncated to h bits; the round keys derive from
  ``key``, so every key gives another bijection of [0, 2^(2h)).
* Cycle-walking brings it down to [0, n): re-apply the network while the value is >= n.
  Following x's cycle in the bijection on the big domain, the first value < n is unique per
  x, so the walk is a bijection on [0, n); its inverse walks the inverse network. Since
  2^(2h) < 4 n (for n >= 2), a walk takes fewer than 4 steps on average; only the entries
  still out of range are iterated again.

All arithmetic is wrapping uint64 on arrays (numpy does not warn about array overflow).
"""
from __future__ import annotations

import numpy as np

_ROUNDS = 6  # >= 4 (Luby-Rackoff); two more cost little and mix small domains better
# A walk of w steps has probability < (3/4)^w: this cap is never reached by a bijection.
_MAX_WALK = 1000
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def splitmix_step(state, values) -> np.ndarray:
    """One step of the splitmix64 chain that ``sampler.mix64`` runs, vectorised.

    ``state`` (int or uint64 array) absorbs ``values`` (ints >= 0, array or scalar); the result
    is a uint64 array. Starting from 0x9E3779B97F4A7C15 and absorbing v1, v2, ... in turn
    gives exactly ``mix64(v1, v2, ...)``.
    """
    z = np.atleast_1d(np.asarray(state, dtype=np.uint64) ^ np.asarray(values).astype(np.uint64))
    z = (z ^ (z >> np.uint64(30))) * _M1  # arrays wrap silently; numpy scalars would warn
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _round_keys(key, rounds: int) -> list[np.ndarray]:
    """Round key j = mix64(key, j), for a scalar key or one key per element."""
    state = splitmix_step(_GOLDEN, key)
    return [splitmix_step(state, j) for j in range(rounds)]


def _feistel(x: np.ndarray, keys: list[np.ndarray], h: np.uint64, mask: np.uint64,
             backward: bool) -> np.ndarray:
    """One pass of the network over 2h-bit words x (uint64), forward or inverse."""
    left, right = x >> h, x & mask
    order = range(len(keys) - 1, -1, -1) if backward else range(len(keys))
    for j in order:
        if backward:  # (l, r) = (r' ^ F_j(l'), l')
            left, right = right ^ _round(keys[j], left, mask), left
        else:         # (l', r') = (r, l ^ F_j(r))
            left, right = right, left ^ _round(keys[j], right, mask)
    return (left << h) | right


def _round(key: np.ndarray, half: np.ndarray, mask: np.uint64) -> np.ndarray:
    """F_j(half): 64-bit hash of (round key, half), truncated to h bits."""
    return splitmix_step(key, half) & mask


def permute(n: int, key, x, inverse: bool = False) -> np.ndarray:
    """Apply the bijection of [0, n) chosen by ``key`` (or its inverse) to the int array x.

    ``key`` is an int, or an array shaped like x giving each element its own bijection (all
    on the same n): a batch that spans many epochs or passes stays one vectorised call.
    """
    n = int(n)
    if not 1 <= n <= (1 << 63) - 1:
        raise ValueError(f"KeyedPermutation: n must be in [1, 2^63), got {n}")
    x = np.asarray(x, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"KeyedPermutation: inputs must lie in [0, {n})")
    # Half width h >= 1: n = 1 still runs the (then trivial) walk on a 4-value domain.
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    h, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    per_element = np.ndim(key) > 0
    if per_element:
        key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape).ravel()
    else:
        key = int(key) & _MASK64
    keys = _round_keys(key, _ROUNDS)
    y = _feistel(x.ravel().astype(np.uint64), keys, h, mask, inverse)
    top = np.uint64(n)
    out = np.flatnonzero(y >= top)
    for _ in range(_MAX_WALK):  # cycle-walking, only over the entries still out of range
        if not out.size:
            break
        sub = [k[out] for k in keys] if per_element else keys
        y[out] = _feistel(y[out], sub, h, mask, inverse)
        out = out[y[out] >= top]
    else:
        raise RuntimeError(f"KeyedPermutation: cycle-walking on n={n} did not end (the network is not a bijection)")
    return y.astype(np.int64).reshape(x.shape)


class KeyedPermutation:
    """A bijection of [0, n) chosen by ``key``; ``perm(x)`` and ``perm.inverse(x)`` on int arrays.

    O(1) memory in n: the object holds n and the key; each call costs O(len(x)).
    """

    def __init__(self, n: int, key: int):
        if not 1 <= int(n) <= (1 << 63) - 1:
            raise ValueError(f"KeyedPermutation: n must be in [1, 2^63), got {n}")
        self.n, self.key = int(n), int(key) & _MASK64

    def __call__(self, x) -> np.ndarray:
        """Images of x (int values in [0, n))."""
        return permute(self.n, self.key, x)

    def inverse(self, y) -> np.ndarray:
        """Pre-images of y: ``perm.inverse(perm(x)) == x``."""
        return permute(self.n, self.key, y, inverse=True)
