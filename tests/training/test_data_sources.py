"""Training reads the same samples whatever the data source: a folder, its file:// URL, a pipe:
command, or the same tars as an energon-prepared folder (read through energon's metadata)."""
from __future__ import annotations

import functools
import shutil

import pytest

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import by_iteration, train
from toolkits.pretrain_data_preprocessing import energon_prepare

pytestmark = pytest.mark.distributed


def _expect_reader(kind: str, ctx):
    """A `train` patch: the loader reads through `kind` (EnergonDataset, ShardedDataset)."""
    got = type(ctx.train_loader.datasets[0]).__name__
    if got != kind:
        raise AssertionError(f"the loader reads through {got}, not {kind}")


def _losses(inputs, tmp_path, name, data_path, reader="ShardedDataset"):
    flags = train_flags(inputs, tmp_path / name, iters=3, gbs=2)
    flags[flags.index("--data-path") + 1] = data_path
    run_distributed(1, train, flags, functools.partial(_expect_reader, reader))
    metrics = by_iteration(tmp_path / name / "metrics.jsonl")
    return [(metrics[i]["lm_loss"], metrics[i]["grad_norm"], metrics[i]["consumed_samples"]) for i in sorted(metrics)]


def test_every_data_source_trains_on_the_same_samples(tmp_path):
    inputs = training_inputs()
    folder = inputs["train"]
    want = _losses(inputs, tmp_path, "folder", str(folder))
    assert len(want) == 3
    assert _losses(inputs, tmp_path, "file_url", folder.resolve().as_uri()) == want
    assert _losses(inputs, tmp_path, "pipe", f"pipe:cat {folder}/{{name}}") == want


def test_an_energon_prepared_folder_trains_like_ours(tmp_path):
    pytest.importorskip("megatron.energon", reason="megatron-energon (the 'energon' extra) is not installed")
    inputs = training_inputs()
    energon = tmp_path / "energon"
    shutil.copytree(inputs["train"], energon)
    energon_prepare.main([str(energon)])
    (energon / "index.json").unlink()  # now only energon's metadata describes the tars
    for sidecar in energon.glob("*.idx.json"):
        sidecar.unlink()
    want = _losses(inputs, tmp_path, "ours", str(inputs["train"]))
    assert _losses(inputs, tmp_path, "energon", str(energon), reader="EnergonDataset") == want
