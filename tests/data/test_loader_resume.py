"""Loader: exact resume over DP sizes and worker counts (with skips); training-time corruption."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from megatron_patch.data.errors import DataQualityError, ShardIndexError, SkipSample
from megatron_patch.data.loader import ResumableLoader
from megatron_patch.data.shards import ShardedDataset, sidecar_path

pytestmark = pytest.mark.unit


MBS = 2
SEED = 77


def encode(record, images):
    """Trivial encoder: the id (+ image sizes); rejects one id to exercise SkipSample."""
    if record["id"] == "B-3":
        raise SkipSample("too_long")
    return {"id": record["id"], "sizes": [im.size for im in images]}


def encode_with_rng(record, images):
    return {"id": record["id"], "r": (random.random(), float(torch.rand(1)))}


def collate(samples):
    return {"ids": [s["id"] for s in samples], "extra": [s.get("r") for s in samples]}


def encode_tokens(record, images):
    """``encode`` plus a token row to pack, 3-11 tokens long depending on the id."""
    sample = encode(record, images)
    n = 3 + sum(map(ord, record["id"])) % 9
    tokens = torch.full((n,), len(images))
    return {**sample, "tokens": tokens, "labels": tokens, "loss_mask": torch.ones(n), "pixel_values": []}


def collate_rows(rows):
    """The ids of each row (a packed row holds several samples)."""
    return {"ids": [row.get("ids", row.get("id")) for row in rows]}


def collate_rng_probe(samples):
    """Draws from the worker's global RNGs: collate runs in the worker, outside any per-sample seeding."""
    worker = torch.utils.data.get_worker_info().id
    return {"worker": worker, "draws": (random.random(), float(np.random.random()), float(torch.rand(1)))}


def corrupt(shard_dir, sample, suffix, how):
    """Damage member ``KEY.suffix`` of sample ``sample`` in place (tar layout stays intact)."""
    ds = ShardedDataset(shard_dir)
    tar, key = ds.locate(sample)
    with open(sidecar_path(tar)) as f:
        entry = dict((k, m) for k, m in json.load(f)["samples"])[key]
    _, offset, size = next(m for m in entry if m[0] == suffix)
    with open(tar, "r+b") as f:
        if how == "header":
            f.seek(offset - 512 + 148)  # checksum field of the member's header
            f.write(b"0000000\0")
        else:  # overwrite the data bytes
            f.seek(offset)
            f.write(b"\x00" * size if how == "zeros" else b"{" * size)
    return os.path.basename(tar)


@pytest.fixture(scope="module")
def damaged(shard_dirs, tmp_path_factory):
    """Copies of A and B with a bad-JSON sample and a corrupt tar header in A."""
    root = tmp_path_factory.mktemp("damaged")
    a, b = str(root / "A"), str(root / "B")
    shutil.copytree(shard_dirs["A"], a)
    shutil.copytree(shard_dirs["B"], b)
    corrupt(a, 4, "json", "json")     # bad_json
    corrupt(a, 10, "0.jpg", "header")  # corrupt_tar_member (sample 10 has 1 jpg image)
    return [a, b]


def make(dirs, **kw):
    kw = {"encode": encode, "collate": collate, "micro_batch_size": MBS, "seed": SEED,
          "weights": [0.6, 0.4], "max_bad_sample_fraction": 1.0, **kw}
    return ResumableLoader(dirs, **kw)


def take(loader, steps):
    it = iter(loader)
    out = [next(it)["ids"] for _ in range(steps)]
    it.close()
    return out


@pytest.fixture(scope="module")
def reference(damaged):
    """Uninterrupted global sequence: ids per position (dp=1, mbs=1, no workers)."""
    return [ids[0] for ids in take(make(damaged, micro_batch_size=1), 60)]


def rank_view(reference, rank, dp, steps, start_step=0):
    g = MBS * dp
    return [reference[s * g + rank * MBS: s * g + (rank + 1) * MBS]
            for s in range(start_step, start_step + steps)]


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_matrix(damaged, reference, dp, workers):
    total_steps = 60 // (MBS * dp)
    stop = {1: 7, 2: 3, 4: 2}[dp] + workers  # an arbitrary step
    for rank in range(dp):
        first = make(damaged, dp_rank=rank, dp_size=dp, num_workers=workers)
        head = take(first, stop)
        assert first.consumed_samples == stop * MBS * dp  # yielded, not prefetched
        resumed = make(damaged, dp_rank=rank, dp_size=dp, num_workers=workers,
                       consumed_samples=first.consumed_samples)
        tail = take(resumed, min(3, total_steps - stop))
        assert head + tail == rank_view(reference, rank, dp, stop + len(tail))


def test_skipped_samples_are_substituted_and_counted(damaged, reference):
    assert not {"A-4", "A-10", "B-3"} & set(reference)  # bad samples never reach a batch
    loader = make(damaged, micro_batch_size=60)
    next(iter(loader))
    stats = loader.snapshot()
    assert stats["substituted"] >= 1 and stats["dropped"] == 0
    # Damaged data counts as bad; the encoder's own skips are counted apart (policy, not damage).
    reasons = stats["by_reason"]
    assert stats["skipped"] == reasons.get("too_long", 0) > 0
    assert stats["bad"] == reasons.get("bad_json", 0) + reasons.get("corrupt_tar_member", 0) > 0
    assert set(reasons) <= {"bad_json", "corrupt_tar_member", "too_long"}


@pytest.mark.parametrize("old_dp,new_dp", [(2, 4), (4, 1), (1, 3)])
def test_resume_with_other_dp_size(damaged, reference, old_dp, new_dp):
    steps_before = 2
    consumed = steps_before * MBS * old_dp
    merged = {}
    for rank in range(new_dp):
        loader = make(damaged, dp_rank=rank, dp_size=new_dp, consumed_samples=consumed)
        for step, ids in enumerate(take(loader, 3)):
            start = consumed + step * MBS * new_dp + rank * MBS
            merged.update({start + j: x for j, x in enumerate(ids)})
    assert [merged[p] for p in sorted(merged)] == reference[consumed: consumed + 3 * MBS * new_dp]


def test_encode_randomness_independent_of_workers_and_caller_rng(shard_dirs):
    dirs = [shard_dirs["A"]]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = {}
    for w in (0, 2):
        loader = ResumableLoader(dirs, encode=encode_with_rng, collate=collate, micro_batch_size=3,
                                 seed=SEED, num_workers=w)
        it = iter(loader)
        batches[w] = [next(it)["extra"] for _ in range(4)]
        it.close()
    assert batches[0] == batches[2]
    assert torch.equal(torch.get_rng_state(), before)  # loading did not touch the caller's RNG


def test_training_time_corruption_counted_then_fatal(shard_dirs, tmp_path):
    a = str(tmp_path / "A")
    shutil.copytree(shard_dirs["A"], a)
    corrupt(a, 1, "0.png", "zeros")    # undecodable_image, shard-000000
    corrupt(a, 2, "json", "json")      # bad_json,          shard-000000
    corrupt(a, 17, "json", "header")   # corrupt_tar_member, shard-000002
    n = len(ShardedDataset(a))
    # One micro-batch = one whole epoch; no substitutes -> every count is exact.
    loader = ResumableLoader([a], encode=encode, collate=collate, micro_batch_size=n,
                             num_substitutes=0, max_bad_sample_fraction=0.5)
    it = iter(loader)
    batch = next(it)
    stats = loader.snapshot()  # the counters as the batch was yielded
    it.close()
    # The micro-batch keeps its shape: each dropped slot is an all-pad row with no id.
    assert len(batch["ids"]) == n and batch["ids"].count("") == 3 and stats["dropped"] == 3
    assert stats["seen"] == n and stats["bad"] == 3
    assert stats["by_reason"] == {"undecodable_image": 1, "bad_json": 1, "corrupt_tar_member": 1}

    strict = ResumableLoader([a], encode=encode, collate=collate, micro_batch_size=n,
                             num_substitutes=0, max_bad_sample_fraction=0.05,
                             min_samples_before_check=1)
    with pytest.raises(DataQualityError) as exc:
        next(iter(strict))
    msg = str(exc.value)
    assert "shard-000000.tar (2 bad)" in msg and "--max-bad-sample-fraction" in msg
    assert "\n" not in msg


def test_changed_shard_is_reported_at_startup(shard_dirs, tmp_path):
    a = str(tmp_path / "A")
    shutil.copytree(shard_dirs["A"], a)
    with open(os.path.join(a, "shard-000001.tar"), "r+b") as f:
        f.truncate(2048)
    with pytest.raises(ShardIndexError, match="shard-000001.tar changed size"):
        ResumableLoader([a], encode=encode, collate=collate, micro_batch_size=1)


def test_workers_are_seeded_per_rank_and_worker_and_reproducibly(shard_dirs):
    def first_draws():
        """(dp rank, worker id) -> the first draws of that worker's python, numpy and torch RNGs."""
        out = {}
        for rank in (0, 1):
            loader = ResumableLoader([shard_dirs["A"]], encode=encode, collate=collate_rng_probe,
                                     micro_batch_size=1, seed=SEED, dp_rank=rank, dp_size=2, num_workers=2)
            it = iter(loader)
            for _ in range(2):  # batches go round-robin: one from each worker
                batch = next(it)
                out[rank, batch["worker"]] = batch["draws"]
            it.close()
        return out

    draws = first_draws()
    assert sorted(draws) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rng in range(3):  # python, numpy, torch: a distinct stream on every rank and worker
        assert len({d[rng] for d in draws.values()}) == 4
    assert first_draws() == draws  # and the same on the next run


@pytest.mark.parametrize("workers,prefetch", [(0, 2), (2, 3), (1, 4)])
def test_workers_prefetch_ahead_of_consumption(shard_dirs, workers, prefetch):
    loader = ResumableLoader([shard_dirs["A"]], encode=encode, collate=collate, micro_batch_size=MBS,
                             seed=SEED, num_workers=workers, prefetch_factor=prefetch)
    it = iter(loader)
    next(it)
    next(it)
    # The DataLoader keeps prefetch x workers batches in flight; none without workers.
    assert loader.consumed_samples == 2 * MBS
    assert loader.prefetched_samples == prefetch * workers * MBS
    it.close()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_resume_through_load_state_dict(damaged, packed, workers):
    """Training's path: the loader is built at position 0, then given the checkpoint's state."""
    kw = {"dp_rank": 1, "dp_size": 2, "num_workers": workers}
    if packed:
        kw.update(encode=encode_tokens, collate=collate_rows, pack_seq_length=16, pack_buffer_size=4)
    steps, stop = 9, 4
    whole = make(damaged, **kw)
    uninterrupted = take(whole, steps)
    first = make(damaged, **kw)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = make(damaged, **kw)
    resumed.load_state_dict(state)
    assert head + take(resumed, steps - stop) == uninterrupted
    assert resumed.state_dict() == whole.state_dict()
