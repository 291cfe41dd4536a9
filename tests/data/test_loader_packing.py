"""Loader with --pack-sequences: fixed-shape packed micro-batches, every sample once, exact resume."""
import json

import pytest
import torch

from megatron_patch.data.collate import collate
from megatron_patch.data.encoder import SampleEncoder
from megatron_patch.data.loader import ResumableLoader, decode_image
from megatron_patch.data.packing import ResumablePacker, SequencePacker
from tests.data.encoder_fixtures import tokenizer_dir

pytestmark = pytest.mark.unit


SEQ, MBS, BUFFER, SEED = 64, 2, 10, 31  # encoded samples are 13-29 tokens: 2-4 per row
COMPARED = ("ids", "tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values",
            "pixel_attention_mask", "image_mask")


class CollateKeepingIds:
    """The real ``collate`` plus each packed row's sample ids, so tests can see what went where."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, rows):
        return {**collate(rows, SEQ, self.pad_token_id), "ids": [row["ids"] for row in rows]}


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(tokenizer_dir(), seq_length=SEQ, image_seq_len=4, longest_edge=16, shortest_edge=8)


def make(dirs, encoder, **kw):
    kw = {"micro_batch_size": MBS, "seed": SEED, "pack_seq_length": SEQ, "pack_buffer_size": BUFFER, **kw}
    return ResumableLoader(dirs, encode=encoder, collate=CollateKeepingIds(encoder.pad_token_id), **kw)


def take(loader, steps):
    it = iter(loader)
    out = [next(it) for _ in range(steps)]
    it.close()
    return out


def take_until_packer_is_busy(loader, limit):
    """Micro-batches up to the first stop (after two) that leaves packed rows unyielded and samples
    carried over in the packer: the hardest state to restore."""
    it = iter(loader)
    out = [next(it)]
    while len(out) < limit:
        out.append(next(it))
        state = loader.state_dict()["packing"]
        if state["rows"] and any(carried for _, carried in state["buffer"]):
            break
    it.close()
    return out


def ids_at(loader, positions):
    """Reference: the sample ids the global order puts at ``positions`` (read straight from the shards)."""
    ds, idx = loader.order.lookup(positions)
    return [loader.datasets[d].read(i).record["id"] for d, i in zip(ds.tolist(), idx.tolist())]


@pytest.mark.parametrize("dp", [1, 2])
def test_packed_micro_batches_hold_each_sample_once(shard_dirs, encoder, dp):
    dirs = [shard_dirs["A"], shard_dirs["B"]]
    total = 34 // (MBS * dp) * MBS * dp  # whole steps of the first epoch (34 samples)
    ids, fill = [], []
    for rank in range(dp):
        batches = list(make(dirs, encoder, dp_rank=rank, dp_size=dp, total_samples=total))
        for batch in batches:
            assert batch["tokens"].shape == (MBS, SEQ) and batch["pixel_values"].shape[0] == MBS
            ids += [i for row in batch["ids"] for i in row]
        # The last micro-batch of a finite run is topped up with empty rows: judge the others.
        fill += [int(b["attention_mask"].sum()) / (MBS * SEQ) for b in batches[:-1]]
    reference = ids_at(make(dirs, encoder), range(total))
    assert sorted(ids) == sorted(reference)
    if dp == 1:
        assert len(set(ids)) == 34  # the whole epoch, each sample once
    padding = 1 - sum(fill) / len(fill)
    assert padding < 0.15, f"padding {padding:.1%}"


def test_packed_micro_batches_are_the_rank_slice_packed_in_sampler_order(shard_dirs, encoder):
    dirs = [shard_dirs["A"], shard_dirs["B"]]
    dp, rank, steps = 2, 1, 5
    loader = make(dirs, encoder, dp_rank=rank, dp_size=dp)
    # Reference: this rank's positions of the global order, encoded and packed one by one.
    positions = [s * MBS * dp + rank * MBS + j for s in range(40) for j in range(MBS)]
    ds, idx = loader.order.lookup(positions)
    samples = []
    for d, i in zip(ds.tolist(), idx.tolist()):
        raw = loader.datasets[d].read(i)
        samples.append(encoder(raw.record, [decode_image(b, raw.shard, raw.key, k) for k, b in enumerate(raw.images)]))
    rows = list(SequencePacker(SEQ, BUFFER).pack_stream(samples))
    collator = CollateKeepingIds(encoder.pad_token_id)
    for step, got in enumerate(take(loader, steps)):
        _same(got, collator(rows[step * MBS: (step + 1) * MBS]))


def test_packer_state_restores_buffer_carry_counts_and_rows():
    lengths = [9, 3, 7, 5, 8, 2, 6, 6, 4, 9, 1, 7, 3, 8, 5, 2, 9, 4]
    samples = [{"id": str(i), "tokens": torch.full((n,), i), "labels": torch.full((n,), i),
                "loss_mask": torch.ones(n), "pixel_values": []} for i, n in enumerate(lengths)]

    def run(packer, start, stop):
        out = []
        for p in range(start, stop):
            packer.push(p, samples[p])
            while rows := packer.pop_batch():
                out.append([r["ids"] for r in rows])
        return out

    # max_carry=1: a sample carried once must not be carried again, so carry counts matter.
    new = lambda: ResumablePacker(seq_length=12, buffer_size=4, rows_per_batch=2, max_carry=1)  # noqa: E731
    whole = run(new(), 0, len(samples))
    for stop in range(1, len(samples)):
        first = new()
        head = run(first, 0, stop)
        resumed = new()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())), lambda p: samples[p])
        assert head + run(resumed, stop, len(samples)) == whole, f"stop {stop}"


def _same(a, b):
    assert a.keys() >= set(COMPARED)
    for key in COMPARED:
        assert (a[key] == b[key]) if key == "ids" else torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_dict_yields_the_uninterrupted_micro_batches(shard_dirs, encoder, dp, workers):
    dirs = [shard_dirs["A"], shard_dirs["B"]]
    steps = 8
    for rank in range(dp):
        kw = {"dp_rank": rank, "dp_size": dp, "num_workers": workers}
        uninterrupted = take(make(dirs, encoder, **kw), steps)
        first = make(dirs, encoder, **kw)
        head = take_until_packer_is_busy(first, steps - 2)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
        assert state["packing"]["rows"], "no stop point exercised the packed-rows state"
        resumed = make(dirs, encoder, **kw)
        resumed.load_state_dict(state)
        for got, want in zip(head + take(resumed, steps - len(head)), uninterrupted, strict=True):
            _same(got, want)


def test_packed_state_refuses_another_setup(shard_dirs, encoder):
    dirs = [shard_dirs["A"]]
    first = make(dirs, encoder, dp_rank=0, dp_size=2)
    take(first, 2)
    state = first.state_dict()
    with pytest.raises(ValueError, match="dp rank 0 of 2 cannot resume on dp rank 0 of 1"):
        make(dirs, encoder).load_state_dict(state)
    with pytest.raises(ValueError, match="buffer_size=10, this loader has 16"):
        make(dirs, encoder, dp_size=2, pack_buffer_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="--pack-sequences"):
        make(dirs, encoder, dp_size=2, pack_seq_length=None).load_state_dict(state)
