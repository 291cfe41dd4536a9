"""Iteration folders, the tracker, per-rank names, checkpoint_info.json and safe .pt loading."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_patch.checkpoint import (
    RELEASE,
    TRACKER_FILE,
    CheckpointError,
    CheckpointInfo,
    iteration_dir_name,
    list_iterations,
    load_pt,
    rank_dir_name,
    read_tracker,
    resolve_iteration,
    write_tracker,
)
from megatron_patch.checkpoint.layout import commit, parse_iteration, staging_path
from megatron_patch.conversion.tooling import parse_size

pytestmark = pytest.mark.unit


def test_names_follow_megatron():
    assert iteration_dir_name(10) == "iter_0000010"
    assert iteration_dir_name("release") == RELEASE
    assert rank_dir_name(1, 0, 1) == "mp_rank_01"
    assert rank_dir_name(1, 2, 4) == "mp_rank_01_002"
    assert parse_iteration("iter_0000042") == 42 and parse_iteration(" 7\n") == 7
    with pytest.raises(CheckpointError, match="'latest'"):
        parse_iteration("latest")


def test_tracker_round_trip_and_resolution(tmp_path):
    assert read_tracker(tmp_path) is None
    for name in ("iter_0000010", "iter_0000200", "release"):
        (tmp_path / name).mkdir()
    assert list_iterations(tmp_path) == [10, 200, RELEASE]
    write_tracker(tmp_path, 200)
    assert (tmp_path / TRACKER_FILE).read_text() == "200\n"
    assert resolve_iteration(tmp_path) == (200, tmp_path / "iter_0000200")
    assert resolve_iteration(tmp_path, "release") == (RELEASE, tmp_path / "release")
    write_tracker(tmp_path, RELEASE)
    assert resolve_iteration(tmp_path)[0] == RELEASE


def test_resolution_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_iteration(tmp_path / "nowhere")
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(CheckpointError, match=f"no {TRACKER_FILE}.*folders present: 10"):
        resolve_iteration(tmp_path)
    with pytest.raises(CheckpointError, match="iteration 20, but .*iter_0000020 does not exist"):
        resolve_iteration(tmp_path, 20)
    write_tracker(tmp_path, 30)
    with pytest.raises(CheckpointError, match="tracker .* names iteration 30"):
        resolve_iteration(tmp_path)
    (tmp_path / TRACKER_FILE).write_text("banana")
    with pytest.raises(CheckpointError, match="holds 'banana'"):
        read_tracker(tmp_path)


def test_commit_replaces_only_when_asked(tmp_path):
    final = tmp_path / "release"
    for content in ("old", "new"):
        staging = staging_path(final)
        staging.mkdir()
        (staging / "f").write_text(content)
        if content == "old":
            commit(staging, final)
        else:
            with pytest.raises(CheckpointError, match="already exists"):
                commit(staging, final)
            commit(staging, final, replace=True)
    assert (final / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_info_round_trip_and_version_check(tmp_path):
    info = CheckpointInfo(iteration=5, tensor_model_parallel_size=2, pipeline_model_parallel_size=3,
                          decoder_first_pipeline_num_layers=2, num_tensors=9, total_bytes=100, created_by="test")
    info.write(tmp_path)
    assert CheckpointInfo.read(tmp_path) == info
    assert info.parallel_options().pipeline_model_parallel_size == 3
    data = json.loads((tmp_path / "checkpoint_info.json").read_text())
    data["format_version"] = 99
    (tmp_path / "checkpoint_info.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format_version 99"):
        CheckpointInfo.read(tmp_path)


class Payload:
    """Not a tensor: weights_only loading must refuse to build it."""


def test_load_pt_is_weights_only(tmp_path):
    good = {"step": 3, "exp_avg": torch.ones(2)}
    torch.save(good, tmp_path / "ok.pt")
    assert torch.equal(load_pt(tmp_path / "ok.pt")["exp_avg"], good["exp_avg"])
    torch.save({"evil": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_pt(tmp_path / "bad.pt")


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("100") == 100
    with pytest.raises(CheckpointError, match="'lots'"):
        parse_size("lots")
