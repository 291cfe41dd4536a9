"""The global order: pure function of (seed, epoch, position); blends; DP slicing; substitutes.

Also the keyed permutations under it, and that it holds at 10^9 samples in O(1) memory.
"""
import tracemalloc

import numpy as np
import pytest

from megatron_patch.data.permutation import KeyedPermutation, permute
from megatron_patch.data.sampler import (DistributedSampler, GlobalOrder, blend_quotas,
                                         parse_data_path)

pytestmark = pytest.mark.unit


def test_parse_data_path():
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["3", "a"]) == (["a"], [3.0])
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["0.7", "a", "b"])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        parse_data_path(["-1", "a"])


def test_blend_quotas():
    assert blend_quotas([5, 7], None) == [5, 7]
    assert blend_quotas([5, 7], [5, 7]) == [5, 7]  # proportional weights == unweighted
    assert blend_quotas([10, 10], [0.7, 0.3]) == [14, 6]
    q = blend_quotas([3, 3, 3], [1, 1, 1])
    assert q == [3, 3, 3] and sum(blend_quotas([7, 2, 2], [0.5, 0.25, 0.25])) == 11
    with pytest.raises(ValueError, match="no samples"):
        blend_quotas([0, 4], [0.5, 0.5])


def test_order_is_pure_function_and_epochs_are_permutations():
    a = GlobalOrder([23, 11], seed=5)
    b = GlobalOrder([23, 11], seed=5)
    pos = np.arange(0, 5 * 34)
    da, ia = a.lookup(pos)
    # Query b in a scrambled order: answers depend on the position only.
    perm = np.random.default_rng(0).permutation(len(pos))
    db, ib = b.lookup(pos[perm])
    assert (db == da[perm]).all() and (ib == ia[perm]).all()
    for e in range(5):  # unweighted: every epoch visits every sample exactly once
        sl = slice(34 * e, 34 * (e + 1))
        pairs = sorted(zip(da[sl].tolist(), ia[sl].tolist()))
        assert pairs == [(0, i) for i in range(23)] + [(1, i) for i in range(11)]
    assert not (ia[:34] == ia[34:68]).all()  # epochs are reshuffled
    c = GlobalOrder([23, 11], seed=6)
    assert not (c.lookup(pos)[1] == ia).all()


def test_weighted_blend_and_unshuffled():
    order = GlobalOrder([20, 4], weights=[0.5, 0.5], seed=1)
    ds, idx = order.lookup(np.arange(24 * 3))
    assert (ds == 1).sum() == 36  # 12 of 24 slots per epoch
    for e in range(3):
        # Dataset 1 is repeated 3x per epoch: three whole passes over its 4 samples.
        small = idx[24 * e:24 * (e + 1)][ds[24 * e:24 * (e + 1)] == 1]
        assert sorted(small.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    plain = GlobalOrder([3, 2], shuffle=False)
    assert list(zip(*map(list, plain.lookup(range(5))))) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    # Unshuffled with weights: datasets stay concatenated, passes in stored order across epochs.
    wplain = GlobalOrder([3, 2], weights=[0.2, 0.8], shuffle=False)
    assert wplain.quotas == [1, 4]
    assert list(zip(*map(list, wplain.lookup(range(10))))) == [
        (0, 0), (1, 0), (1, 1), (1, 0), (1, 1), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1)]


def test_passes_straddle_epochs():
    # q_1 = 6 draws per epoch of a 4-sample dataset: pass 0 = draws 0-3 (epoch 0),
    # pass 1 = draws 4-5 (epoch 0) and 6-7 (epoch 1), pass 2 = draws 8-11 (epoch 1).
    order = GlobalOrder([14, 4], weights=[12, 6], seed=2)
    assert order.quotas == [12, 6]
    ds, idx = order.lookup(np.arange(18 * 2))
    first = np.bincount(idx[:18][ds[:18] == 1], minlength=4)
    assert sorted(first.tolist()) == [1, 1, 2, 2]  # one whole pass plus half of the next
    both = np.bincount(idx[ds == 1], minlength=4)
    assert both.tolist() == [3, 3, 3, 3]  # two epochs = three whole passes
    # Dataset 0 (14 samples, 12 slots): epochs 0 and 1 take draws 0-11 and 12-23.
    # Dataset 0 (14 samples, 12 slots): epoch 0 is draws 0-11 (12 distinct samples of pass 0),
    # epoch 1 draws 12-23 (the rest of pass 0, then 10 of pass 1).
    assert len(set(idx[:18][ds[:18] == 0].tolist())) == 12
    big = np.bincount(idx[ds == 0], minlength=14)
    assert big.min() == 1 and (big == 2).sum() == 10


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_dp_ranks_tile_the_global_sequence(dp_size):
    order = GlobalOrder([17], seed=3)
    mbs, steps, consumed = 2, 5, 6
    per_rank = []
    for r in range(dp_size):
        it = iter(DistributedSampler(order, mbs, r, dp_size, consumed_samples=consumed))
        per_rank.append([next(it) for _ in range(steps)])
    merged = [slot[0][0] for s in range(steps) for r in range(dp_size) for slot in per_rank[r][s]]
    assert merged == list(range(consumed, consumed + steps * mbs * dp_size))
    ds, idx = order.lookup(merged)
    assert [slot[0][2] for s in range(steps) for r in range(dp_size)
            for slot in per_rank[r][s]] == idx.tolist()


def test_substitutes_are_deterministic_and_in_epoch():
    order = GlobalOrder([10, 5], seed=9)
    s = DistributedSampler(order, 3, 0, 1, consumed_samples=14, num_substitutes=2)
    slots = s.slots(14)
    assert slots == DistributedSampler(GlobalOrder([10, 5], seed=9), 3, num_substitutes=2).slots(14)
    for slot in slots:
        assert len(slot) == 3
        assert all(p // 15 == slot[0][0] // 15 for p, _, _ in slot)  # same epoch as the slot


def test_total_samples_and_argument_errors():
    order = GlobalOrder([10])
    assert len(list(DistributedSampler(order, 2, 1, 2, consumed_samples=4, total_samples=15))) == 2
    with pytest.raises(ValueError, match="rank 2"):
        DistributedSampler(order, 2, 2, 2)
    with pytest.raises(ValueError, match="--micro-batch-size"):
        DistributedSampler(order, 0)
    with pytest.raises(ValueError, match="--seed"):
        GlobalOrder([3], seed=-1)


def test_drawn_until_follows_the_steps_handed_out():
    sampler = DistributedSampler(GlobalOrder([10]), 2, 1, 2, consumed_samples=4)
    it = iter(sampler)
    assert sampler.drawn_until == 4
    next(it)
    next(it)
    assert sampler.drawn_until == 4 + 2 * 4  # two steps of mbs x dp_size positions


# ---- keyed permutations ------------------------------------------------------------------

KEYS = (0, 1, 12345, 2**64 - 1)


def test_keyed_permutation_is_a_bijection_exhaustively():
    for n in list(range(1, 301)) + [4097, 65537]:
        for key in KEYS if n <= 300 else KEYS[:2]:
            perm = KeyedPermutation(n, key)
            x = np.arange(n)
            y = perm(x)
            assert np.array_equal(np.sort(y), x), (n, key)
            assert np.array_equal(perm.inverse(y), x), (n, key)


@pytest.mark.parametrize("n", [10**9, 2**40 + 7])
def test_keyed_permutation_inverts_at_scale(n):
    rng = np.random.default_rng(n % 1000)
    x = rng.integers(0, n, 10**6)
    for key in KEYS[:2]:
        perm = KeyedPermutation(n, key)
        y = perm(x)
        assert y.min() >= 0 and y.max() < n
        assert np.array_equal(perm.inverse(y), x) and np.array_equal(perm(perm.inverse(x)), x)


def test_keys_choose_different_orders_and_per_element_keys_agree():
    x = np.arange(1000)
    orders = [KeyedPermutation(1000, k)(x) for k in KEYS]
    for i in range(len(orders)):
        assert (orders[i] != x).mean() > 0.9  # not (nearly) the identity
        for j in range(i):
            assert (orders[i] != orders[j]).mean() > 0.9
    # One key per element gives each element the bijection of its own key.
    keys = np.array(KEYS, dtype=np.uint64).repeat(250)
    xs = np.tile(np.arange(250), 4)
    mixed = permute(1000, keys, xs)
    assert all(np.array_equal(mixed[250 * i:250 * (i + 1)], orders[i][:250]) for i in range(4))
    assert np.array_equal(permute(1000, keys, mixed, inverse=True), xs)


def test_every_input_bit_reaches_every_output_bit():
    # Avalanche: flipping one bit of x flips about half of the output bits, so neighbouring
    # positions land on unrelated slots. n = 2^20 needs no cycle-walking: this sees the
    # Feistel network alone (with fewer than 3 rounds some bits barely move).
    perm = KeyedPermutation(1 << 20, 7)
    x = np.random.default_rng(1).integers(0, 1 << 20, 20_000)
    y = perm(x)
    for bit in range(20):
        flipped = perm(x ^ (1 << bit)) ^ y
        per_bit = [((flipped >> b) & 1).mean() for b in range(20)]
        assert 0.4 < min(per_bit) and max(per_bit) < 0.6, (bit, per_bit)


def test_keyed_permutation_errors():
    with pytest.raises(ValueError, match="n must be in"):
        KeyedPermutation(0, 1)
    with pytest.raises(ValueError, match=r"inputs must lie in \[0, 5\)"):
        KeyedPermutation(5, 1)(np.array([5]))


# ---- the order at 10^9 samples -------------------------------------------------------------

BIG = [250_000_000, 750_000_000]  # L = 10^9


@pytest.mark.parametrize("weights", [None, [0.5, 0.5]])
def test_billion_sample_window_has_no_repeats(weights):
    order = GlobalOrder(BIG, weights, seed=11)
    start = 300_000_000  # a window inside epoch 0
    ds, idx = order.lookup(start + np.arange(10**6))
    assert idx.min() >= 0 and (idx < np.array(BIG)[ds]).all()
    share = (ds == 0).mean()
    pairs = ds * (1 << 32) + idx
    if weights is None:
        assert abs(share - 0.25) < 0.01
        assert len(np.unique(pairs)) == len(pairs)
    else:
        # Dataset 1 is down-sampled (5e8 of 7.5e8 per epoch: epoch 0 stays inside its first
        # pass): no repeats. Dataset 0 is drawn twice per epoch (two whole passes): each of
        # its samples at most twice.
        assert abs(share - 0.5) < 0.01
        assert len(np.unique(idx[ds == 1])) == (ds == 1).sum()
        assert np.unique(idx[ds == 0], return_counts=True)[1].max() <= 2
    # Another epoch puts other samples at the same offsets.
    ds1, idx1 = order.lookup(order.epoch_length + start + np.arange(10**6))
    assert ((ds1 == ds) & (idx1 == idx)).mean() < 0.01
    assert (ds1 != ds).mean() > 0.3  # the blend layout itself is reshuffled, not only the draws


@pytest.mark.parametrize("weights", [None, [0.5, 0.5]])
def test_billion_sample_lookup_is_pure(weights):
    L = sum(BIG)
    pos = np.array([0, 1, L - 1, L, 3 * L + 17, 7 * L + 123_456_789, 10**12 + 5, 5, 999_999_999])
    order = GlobalOrder(BIG, weights, seed=4)
    ds, idx = order.lookup(pos)  # one batch spanning many epochs
    fresh = GlobalOrder(BIG, weights, seed=4)
    for i, p in enumerate(pos.tolist()):
        d1, i1 = fresh.lookup([p])
        assert (int(d1[0]), int(i1[0])) == (int(ds[i]), int(idx[i])), p
    subs = order.substitutes(pos, 2)
    assert (subs // L == pos // L).all()
    assert [int(fresh.substitutes([p], 2)[0]) for p in pos.tolist()] == subs.tolist()
    assert not (GlobalOrder(BIG, weights, seed=5).lookup(pos)[1] == idx).all()


def test_epoch_slot_counts_equal_quotas_exhaustively():
    sizes, epochs = [60_000, 40_000], 4
    L = sum(sizes)
    order = GlobalOrder(sizes, [0.3, 0.7], seed=8)
    assert order.quotas == [30_000, 70_000]
    ds, idx = order.lookup(np.arange(epochs * L))  # one batch over 4 epochs
    for e in range(epochs):
        assert np.bincount(ds[e * L:(e + 1) * L], minlength=2).tolist() == order.quotas
    # Dataset 1: 70k draws per epoch of 40k samples; 4 epochs = 7 whole passes.
    up = [np.bincount(idx[:(e + 1) * L][ds[:(e + 1) * L] == 1], minlength=40_000) for e in range(epochs)]
    assert up[0].min() == 1 and (up[0] == 2).sum() == 30_000  # pass 0, then 30k of pass 1
    assert (up[3] == 7).all()
    # Dataset 0: 30k draws per epoch of 60k samples; every 2 epochs one whole pass.
    down = idx[ds == 0]
    assert (np.bincount(down[:60_000], minlength=60_000) == 1).all()
    assert (np.bincount(down, minlength=60_000) == 2).all()

    plain = GlobalOrder(sizes, seed=8)  # unweighted: every sample exactly once per epoch
    ds, idx = plain.lookup(np.arange(3 * L))
    for e in range(3):
        pairs = ds[e * L:(e + 1) * L] * L + idx[e * L:(e + 1) * L]
        assert np.array_equal(np.sort(pairs), np.concatenate([np.arange(60_000), L + np.arange(40_000)]))


def _order_peak_bytes(L: int) -> int:
    tracemalloc.start()
    try:
        order = GlobalOrder([L // 3, L - L // 3], [0.6, 0.4], seed=1)
        order.lookup(L // 2 + np.arange(4096))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_dataset():
    _order_peak_bytes(1000)  # first calls allocate numpy's one-time caches: keep them out
    small, big = _order_peak_bytes(10**6), _order_peak_bytes(10**9)
    assert big < 2 * small and big < 2 * 2**20, (small, big)
