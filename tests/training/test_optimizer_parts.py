"""Optimizer state saved by every DP rank on its own and read back by range.

Unit: part files put back together by `OptimizerPartsReader` (ranges across part boundaries, damaged
or missing parts refused in one line). Distributed (TP1 x PP2 x DP2, distributed optimizer): the save
makes no collective call (every torch.distributed collective raises during it) and writes one part
per DP rank holding that rank's ranges; a resume at the same layout reads exactly the elements its
optimizer holds, never a whole saved tensor.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_patch.checkpoint import CheckpointError
from megatron_patch.checkpoint.optimizer_parts import OptimizerPartsReader, part_file_name, write_part
from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import train

pytestmark = pytest.mark.distributed


KEYS = ("param", "exp_avg", "exp_avg_sq")


def _two_parts(rank_dir, full: torch.Tensor, cut: int) -> None:
    flat = full.reshape(-1)
    for dp, (start, end) in enumerate([(0, cut), (cut, flat.numel())]):
        states = {"exp_avg": flat[start:end], "exp_avg_sq": 2 * flat[start:end]}
        write_part(rank_dir, dp, 2, [("w", start, end, tuple(full.shape), states)])


def test_parts_are_read_back_by_range_across_part_boundaries(tmp_path):
    full = torch.randn(6, 7)
    _two_parts(tmp_path, full, cut=17)
    reader = OptimizerPartsReader(tmp_path)
    assert torch.equal(reader.get("exp_avg/w"), full)
    assert torch.equal(reader.get("exp_avg_sq/w"), 2 * full)
    for start, end in [(0, 17), (3, 30), (17, 42), (16, 18), (41, 42)]:
        assert torch.equal(reader.get_range("exp_avg/w", start, end), full.reshape(-1)[start:end])
    assert "exp_avg/w" in reader and "momentum_buffer/w" not in reader
    with pytest.raises(CheckpointError, match="momentum_buffer/w is missing"):
        reader.get("momentum_buffer/w")


def test_a_missing_or_damaged_part_is_one_line(tmp_path):
    _two_parts(tmp_path, torch.randn(4, 5), cut=9)
    (tmp_path / part_file_name(1)).unlink()
    with pytest.raises(CheckpointError, match="do not form one complete save") as err:
        OptimizerPartsReader(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / part_file_name(1)).write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match=f"corrupt optimizer state file .*{part_file_name(1)}"):
        OptimizerPartsReader(tmp_path)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        OptimizerPartsReader(tmp_path / "elsewhere")


_COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather",
                "reduce_scatter", "reduce_scatter_tensor", "barrier", "all_gather_object", "gather_object",
                "broadcast_object_list", "send", "recv", "isend", "irecv")


@contextlib.contextmanager
def _no_collectives():
    """Every torch.distributed collective raises inside the block."""
    saved = {name: getattr(dist, name) for name in _COLLECTIVES}

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called during the optimizer save")
        return call

    for name in saved:
        setattr(dist, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def save_alone_then_count_resume_reads(flags: list, out_dir: str) -> dict:
    """Resume a run (counting what the optimizer load reads), then save its optimizer state with
    collectives forbidden; returns this rank's figures."""
    from megatron.core import parallel_state as ps

    from megatron_patch.checkpoint.optimizer_parts import OptimizerPartsReader
    from megatron_patch.checkpoint.layout import rank_dir_name
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.checkpoint_parts import OptimizerState
    from megatron_patch.training.optimizer_state import local_state_pieces

    read = {"elements": 0, "whole_tensors": 0}
    get_range, get = OptimizerPartsReader.get_range, OptimizerPartsReader.get

    def counting_range(self, name, start, end):
        read["elements"] += end - start
        return get_range(self, name, start, end)

    def counting_get(self, name):
        read["whole_tensors"] += 1
        return get(self, name)

    OptimizerPartsReader.get_range, OptimizerPartsReader.get = counting_range, counting_get
    try:
        ctx = build_training(parse_args(flags))
    finally:
        OptimizerPartsReader.get_range, OptimizerPartsReader.get = get_range, get
    pieces = local_state_pieces(ctx.model, ctx.optimizer, ctx.opts, KEYS)
    held = sum(end - start for _, start, end, _, _ in pieces) * len(KEYS)
    rank_dir = f"{out_dir}/{rank_dir_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), 2)}"
    with _no_collectives():
        OptimizerState(ctx.model, ctx.optimizer, ctx.opts, ctx.settings.checkpoint, ctx.device).snapshot(copy=False)(
            Path(out_dir))
    mine = {name: (start, end) for name, start, end, _, _ in pieces}
    return {"read": read, "held": held, "dp": ps.get_data_parallel_rank(), "rank_dir": rank_dir, "ranges": mine,
            "states": {name: {k: v.clone() for k, v in states.items()} for name, _, _, _, states in pieces}}


def test_each_dp_rank_saves_its_own_part_without_collectives_and_resume_reads_only_its_range(tmp_path):
    inputs = training_inputs()
    extra = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save-interval", "2",
             "--lr-decay-iters", "4"]
    run_distributed(4, train, train_flags(inputs, tmp_path / "run", iters=2, extra=extra))
    flags = train_flags(inputs, tmp_path / "resumed", iters=4, extra=extra + ["--load", str(tmp_path / "run")])
    ranks = run_distributed(4, save_alone_then_count_resume_reads, flags, str(tmp_path / "saved"))
    for rank in ranks:
        assert rank["held"] > 0
        assert rank["read"] == {"elements": rank["held"], "whole_tensors": 0}  # its own range, nothing else
        reader = OptimizerPartsReader(rank["rank_dir"])
        first = OptimizerPartsReader(tmp_path / "run" / "iter_0000002" / reader.rank_dir.name)
        assert sorted(p.name for p in reader.rank_dir.iterdir()) == [part_file_name(0), part_file_name(1)]
        for name, (start, end) in rank["ranges"].items():
            for key in KEYS:  # loaded from the first save, and saved again as the optimizer held it
                held = rank["states"][name][key]
                assert torch.equal(first.get_range(f"{key}/{name}", start, end), held), (key, name)
                assert torch.equal(reader.get_range(f"{key}/{name}", start, end), held), (key, name)
    # The two DP ranks of a stage hold disjoint ranges that together cover every trainable tensor.
    for stage_dir in {rank["rank_dir"] for rank in ranks}:
        reader = OptimizerPartsReader(stage_dir)
        for name, pieces in reader.pieces.items():
            spans = sorted((start, end) for _, start, end in pieces)
            assert spans[0][0] == 0 and spans[-1][1] == torch.Size(reader.shapes[name]).numel(), name
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name
