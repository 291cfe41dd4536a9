"""Worker -> main transport (``worker_transport.to_wire`` / ``from_wire``): shared memory for images, same batches.

The shards are the conftest's (built by our tool); the encoder upsizes their small images to
Idefics2's shortest edge of 378 px, so every vision input (~570 KB uint8) is above ``SHM_MIN_BYTES``.
"""
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions on ForkingPickler)

from megatron_patch.data.collate import Collator
from megatron_patch.data.encoder import SampleEncoder
from megatron_patch.data.image_processing import PendingImage
from megatron_patch.data.loader import ResumableLoader
from megatron_patch.data.worker_transport import SHM_MIN_BYTES, from_wire, to_wire
from megatron_patch.data.packing import ResumablePacker
from tests.data.encoder_fixtures import tokenizer_dir

pytestmark = pytest.mark.unit


SEQ, MBS, SEED = 128, 2, 5


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(tokenizer_dir(), seq_length=SEQ, image_seq_len=4, longest_edge=980, shortest_edge=378)


def make(shard_dirs, encoder, packed, **kw):
    return ResumableLoader([shard_dirs["A"], shard_dirs["B"]], encode=encoder,
                           collate=Collator(SEQ, encoder.pad_token_id), micro_batch_size=MBS, seed=SEED,
                           total_samples=12, pack_seq_length=SEQ if packed else None, pack_buffer_size=4, **kw)


def first_items(loader, n=3):
    """What workers would return for the first ``n`` sampler items (read in this process)."""
    sampler = iter(loader._sampler())
    return [loader.reader.read(next(sampler)) for _ in range(n)]


def leaves(obj):
    """Every array / tensor leaf, looking inside ``PendingImage``s and the wire wrappers."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        yield obj
    elif isinstance(obj, PendingImage):
        yield from leaves(obj.pixels)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from leaves(v)
    elif hasattr(obj, "__slots__"):  # _SharedArray / _PipedTensor
        for name in obj.__slots__:
            yield from leaves(getattr(obj, name))


def same(a, b, where=""):
    """Equal structure, types, dtypes and values (bit for bit)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, PendingImage):
        assert a.normaliser is b.normaliser or pickle.dumps(a.normaliser.lut) == pickle.dumps(b.normaliser.lut), where
        same(a.pixels, b.pixels, f"{where}.pixels")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def through_pipe(obj):
    """``obj`` after torch's worker pickler and back, as the DataLoader sends it."""
    return pickle.loads(ForkingPickler.dumps(obj))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_two_workers_give_the_in_process_batches_bit_for_bit(shard_dirs, encoder, packed):
    inline = list(make(shard_dirs, encoder, packed, num_workers=0))
    workers = list(make(shard_dirs, encoder, packed, num_workers=2))
    assert any(b["pixel_values"].numel() for b in inline), "no images in the compared batches"
    assert len(workers) == len(inline)
    for i, (got, want) in enumerate(zip(workers, inline)):
        same(got, want, f"batch {i}")


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_large_arrays_leave_the_worker_as_tensors_small_ones_as_numpy(shard_dirs, encoder, packed):
    with_images = 0
    for item in first_items(make(shard_dirs, encoder, packed), n=4):
        wired = to_wire(item)
        large = [x for x in leaves(wired) if x.nbytes >= SHM_MIN_BYTES]
        assert all(isinstance(x, torch.Tensor) for x in large), [type(x).__name__ for x in large]
        assert all(isinstance(x, np.ndarray) for x in leaves(wired) if x.nbytes < SHM_MIN_BYTES)
        if large:  # with torch's own pickler the image bytes no longer go into the pipe
            with_images += 1
            assert len(ForkingPickler.dumps(wired)) < sum(x.nbytes for x in large) / 10
        same(from_wire(through_pipe(wired)), item)
    assert with_images >= 2, "too few leaves above SHM_MIN_BYTES: the test images are too small"


def test_a_worker_hands_its_images_over_in_shared_memory(shard_dirs, encoder):
    loader = make(shard_dirs, encoder, packed=True, num_workers=1)
    arrived = list(loader._dataloader(loader._sampler()))  # as they leave the DataLoader, before from_wire
    large = [x for item in arrived for x in leaves(item) if x.nbytes >= SHM_MIN_BYTES]
    assert len(large) >= 2 and all(isinstance(x, torch.Tensor) and x.is_shared() for x in large)
    small = [x for item in arrived for x in leaves(item) if x.nbytes < SHM_MIN_BYTES]
    assert small and all(isinstance(x, np.ndarray) for x in small)


def test_packer_and_collate_give_the_same_batch_from_wired_samples(shard_dirs, encoder):
    items = first_items(make(shard_dirs, encoder, packed=True), n=4)
    collate = Collator(SEQ, encoder.pad_token_id)

    def packed_batches(items):
        packer = ResumablePacker(SEQ, buffer_size=4, rows_per_batch=MBS)
        for item in items:
            for position, sample in item["samples"]:
                packer.push(position, sample)
        packer.flush()
        out = []
        while rows := packer.pop_batch(final=True):
            out.append(collate(rows))
        return out

    want = packed_batches(items)
    got = packed_batches([from_wire(through_pipe(to_wire(item))) for item in items])
    assert want and any(b["pixel_values"].numel() for b in want)
    same(got, want)


def test_leaves_that_cannot_cross_are_kept():
    odd = {"bf16": torch.ones(3, dtype=torch.bfloat16), "grad": torch.ones(3, requires_grad=True),
           "objects": np.array([{"a": 1}] * (SHM_MIN_BYTES // 8 + 1), dtype=object),
           "reversed": np.zeros(SHM_MIN_BYTES, np.uint8)[::-1], "text": "x", "pair": (1, [2])}
    wired = to_wire(odd)
    for key in ("bf16", "grad", "objects", "reversed", "text"):
        assert wired[key] is odd[key], key
    assert from_wire(wired)["pair"] == (1, [2])
