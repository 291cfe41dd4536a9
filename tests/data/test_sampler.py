"""The global order: pure function of (seed, epoch, position); blends; DP slicing; substitutes."""
import numpy as np
import pytest

from megatron_patch.data.sampler import (DistributedSampler, GlobalOrder, blend_quotas,
                                         parse_data_path)


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
    small = idx[ds == 1]
    # Dataset 1 is repeated 3x per epoch, each pass a permutation of its 4 samples.
    for k in range(0, 36, 4):
        assert sorted(small[k:k + 4].tolist()) == [0, 1, 2, 3]
    plain = GlobalOrder([3, 2], shuffle=False)
    assert list(zip(*map(list, plain.lookup(range(5))))) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


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
