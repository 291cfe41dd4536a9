"""Megatron-style flags -> DataSettings (training.settings.data_settings) -> build_train_valid_loaders:
blend quotas, ordered validation, packing flags."""
import argparse
import functools
from collections import Counter

import pytest

from megatron_patch.data.collate import Collator, collate
from megatron_patch.data.encoder import add_encoder_arguments, encoder_from_settings
from megatron_patch.data.loader import add_data_arguments, build_train_valid_loaders
from megatron_patch.training.settings import data_settings
from tests.data.encoder_fixtures import tokenizer_dir

pytestmark = pytest.mark.unit


SEQ = 64


def parse(argv):
    parser = add_encoder_arguments(add_data_arguments(argparse.ArgumentParser()))
    # Megatron's own parser defines these; the loader reads them under the same names.
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv + ["--seq-length", str(SEQ), "--num-workers", "0", "--image-size", "16",
                                     "--shortest-edge", "8", "--image-seq-len", "4"])


def collate_with_ids(samples, pad_token_id):
    return {**collate(samples, SEQ, pad_token_id), "ids": [s["id"] for s in samples]}


def loaders(argv, make_collate=lambda pad: functools.partial(collate_with_ids, pad_token_id=pad)):
    settings = data_settings(parse(argv))
    encoder = encoder_from_settings(settings, tokenizer_dir())
    return build_train_valid_loaders(settings, encoder, make_collate(encoder.pad_token_id), dp_rank=0, dp_size=1)


def ids(loader, steps):
    it = iter(loader)
    out = [i for _ in range(steps) for i in next(it)["ids"]]
    it.close()
    return out


def test_blend_quotas_and_ordered_validation_from_flags(shard_dirs):
    a, b = shard_dirs["A"], shard_dirs["B"]  # 23 and 11 samples
    argv = ["--data-path", "0.7", a, "0.3", b, "--valid-data-path", b, "--micro-batch-size", "2", "--seed", "5"]
    train, valid = loaders(argv)
    epoch = ids(train, 17)  # 34 positions = one epoch
    # 0.7 / 0.3 of 34 slots, largest remainder: 24 from A (so one A sample twice), 10 from B.
    assert Counter(i.split("-")[0] for i in epoch) == {"A": 24, "B": 10}
    assert epoch != sorted(epoch, key=lambda i: (i[0], int(i[2:])))  # shuffled
    # Unshuffled, in order, all of it once: the last micro-batch is topped up with an all-pad row.
    assert valid.num_steps() == 6
    assert ids(valid, 6) == [f"B-{i}" for i in range(11)] + [""]
    valid.load_state_dict({"consumed_samples": 0})
    assert len(list(valid)) == 6 and len(list(valid)) == 0  # finite: once through, then done
    other_seed, _ = loaders(argv[:-1] + ["6"])
    assert ids(other_seed, 17) != epoch


def test_pack_flags_reach_the_loader(shard_dirs):
    argv = ["--data-path", shard_dirs["A"], "--micro-batch-size", "2", "--pack-sequences", "--pack-buffer-size", "6"]
    train, valid = loaders(argv, lambda pad: Collator(SEQ, pad))
    assert valid is None
    batch = next(iter(train))
    assert batch["tokens"].shape == (2, SEQ)
    assert len(batch["cu_seqlens"]) - 1 > 2  # more segments than rows: samples were packed
    assert train.state_dict()["packing"]["buffer_size"] == 6
    with pytest.raises(ValueError, match="--pack-buffer-size must be >= 1"):
        loaders(argv[:-1] + ["0"])
