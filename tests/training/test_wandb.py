"""--wandb-project with the real `wandb` package, offline: the run's history read back from its
offline files holds every scalar of metrics.jsonl at its iteration, logged by the reporting rank
(the last stage: not rank 0 at PP2); the config holds the flags; a resumed run appends to the same
W&B run (its id kept in the checkpoint)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import by_iteration, train

pytestmark = pytest.mark.distributed
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def _train_offline(flags: list):
    os.environ["WANDB_MODE"], os.environ["WANDB_SILENT"] = "offline", "true"
    train(flags)


def _records(path: Path):
    """The protobuf records of a W&B transaction log (`run-ID.wandb`: a ':W&B' header, then records
    in 32 KiB blocks, each chunk with a 7-byte header: checksum, length, full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record


def _offline_runs(save_dir: Path) -> list:
    """[(run id, config, {step: {key: value}})] of every offline run folder, oldest first."""
    runs = []
    for folder in sorted((save_dir / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        run_id, config, history = None, {}, {}
        for record in _records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        runs.append((run_id, config, history))
    return runs


def test_offline_wandb_history_equals_the_metrics_and_a_resume_continues_the_run(tmp_path):
    inputs = training_inputs()
    run, save_dir = tmp_path / "run", tmp_path / "wandb_files"
    wandb = ["--wandb-project", "idefics2-tests", "--wandb-exp-name", "tiny", "--wandb-save-dir", str(save_dir),
             "--pipeline-model-parallel-size", "2", "--lr-decay-iters", "5"]
    run_distributed(2, _train_offline, train_flags(inputs, run, iters=3, extra=wandb))
    run_distributed(2, _train_offline, train_flags(inputs, run, iters=5, extra=wandb + ["--load", str(run)]))

    runs = _offline_runs(save_dir)
    assert len(runs) == 2 and runs[0][0] and runs[0][0] == runs[1][0], [r[0] for r in runs]  # one W&B run
    assert json.loads((run / "iter_0000005" / "train_state.json").read_text())["wandb_run_id"] == runs[0][0]
    assert runs[0][1]["lr"] == 1e-3 and runs[0][1]["pipeline_model_parallel_size"] == 2
    logged = {**runs[0][2], **runs[1][2]}
    assert sorted(runs[0][2]) == [1, 2, 3] and sorted(runs[1][2]) == [4, 5]
    metrics = by_iteration(run / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    for iteration, record in metrics.items():
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        assert logged[iteration] == scalars, iteration
