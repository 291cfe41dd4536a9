"""The checks each tool makes before it publishes: every source tensor used exactly once, every rank
folder exactly as the mapping lays it out. The tool-level tests inject a fault into the conversion
itself (a split that yields a wrong shape, a loop that skips a tensor), as a bug there would, and
expect the check to stop the tool with the tensor named and nothing published."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest

from megatron_patch.checkpoint import RELEASE, CheckpointError, ShardedCheckpoint
from megatron_patch.checkpoint.model_files import RankReader, write_rank_tensors
from megatron_patch.checkpoint.verify import verify_rank_folders
from megatron_patch.conversion.read_once import require_used_once
from tests.checkpoint.cli import assert_nothing_written, compose, error_line, hf2mcore, mcore2hf
from tests.checkpoint.fixtures import idefics2_config, save_idefics2, save_llama, save_siglip, tool

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied tiny HF checkpoint and its Megatron conversion at TP=2 x PP=2 (head copy on the last stage)."""
    root = tmp_path_factory.mktemp("verify")
    save_idefics2(root / "hf", idefics2_config("mistral", tied=True), seed=0)
    assert hf2mcore(root / "hf", root / "mg", 2, 2) == 0
    return root


def rewrite_rank(rank_dir, edit):
    """Rewrite a rank folder with `edit(tensors)` applied to all its tensors."""
    reader = RankReader(rank_dir)
    tensors = {name: reader.get(name) for name in reader.names()}
    edit(tensors)
    shutil.rmtree(rank_dir)
    write_rank_tensors(rank_dir, tensors)


NORM = "language_model.decoder.final_layernorm.weight"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(NORM), f"mp_rank_01_001 lacks tensor {NORM}"),
    (lambda t: t.update({NORM: t[NORM][:-1].clone()}), f"mp_rank_01_001: tensor {NORM} has shape (47,), the mapping expects (48,)"),
    (lambda t: t.update({"language_model.extra.weight": t[NORM]}), "mp_rank_01_001 holds tensor language_model.extra.weight, which the mapping"),
])
def test_rank_folder_that_differs_from_the_mapping(tied, tmp_path, edit, message):
    folder = tmp_path / RELEASE
    shutil.copytree(tied / "mg" / RELEASE, folder)
    source = ShardedCheckpoint(folder)
    assert verify_rank_folders(folder, source.hf_config, source.layout, source.tp_size) > 0
    rewrite_rank(folder / "mp_rank_01_001", edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verify_rank_folders(folder, source.hf_config, source.layout, source.tp_size)


def test_stray_rank_folder(tied, tmp_path):
    folder = tmp_path / RELEASE
    shutil.copytree(tied / "mg" / RELEASE, folder)
    shutil.copytree(folder / "mp_rank_01_001", folder / "mp_rank_02_001")
    source = ShardedCheckpoint(folder)
    with pytest.raises(CheckpointError, match="mp_rank_02_001 does not belong to a TP=2 x PP=2 checkpoint"):
        verify_rank_folders(folder, source.hf_config, source.layout, source.tp_size)


def test_used_once_names_the_first_tensor_off_count():
    uses = Counter({"a": 1, "b": 2})
    require_used_once(uses, ["a"], str)
    with pytest.raises(CheckpointError, match="^b was used 2 times instead of once$"):
        require_used_once(uses, ["a", "b", "c"], str)
    with pytest.raises(CheckpointError, match="^tensor c was used 0 times instead of once$"):
        require_used_once(uses, ["c"], lambda n: f"tensor {n}")


def test_hf2mcore_refuses_a_rank_tensor_of_the_wrong_shape(tied, tmp_path, capsys, monkeypatch):
    module = tool("idefics2/hf2mcore.py")
    real = module.hf_to_mcore

    def bad_split(m, hf, rank, size):  # a split rule that drops the last element of one tensor
        shard = real(m, hf, rank, size)
        return shard[:-1] if m.mcore == "vision_model.decoder.final_layernorm.bias" else shard

    monkeypatch.setattr(module, "hf_to_mcore", bad_split)
    assert hf2mcore(tied / "hf", tmp_path / "mg", 2, 2) == 1
    assert "tensor vision_model.decoder.final_layernorm.bias has shape (31,), the mapping expects (32,)" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def drop_mapping_groups(monkeypatch, module, keep):
    """Make a tool's conversion loop see only the mappings `keep(mapping)` accepts."""
    real = module.mapping_groups

    def groups(hf_config):
        kept = [[m for m in group if keep(m)] for group in real(hf_config)]
        return [group for group in kept if group]

    monkeypatch.setattr(module, "mapping_groups", groups)


def test_hf2mcore_refuses_a_source_tensor_left_unread(tied, tmp_path, capsys, monkeypatch):
    drop_mapping_groups(monkeypatch, tool("idefics2/hf2mcore.py"), lambda m: m.mcore != "vision_model.decoder.final_layernorm.bias")
    assert hf2mcore(tied / "hf", tmp_path / "mg", 2, 2) == 1
    assert "source tensor model.vision_model.post_layernorm.bias was used 0 times instead of once" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_mcore2hf_refuses_a_rank_tensor_left_unread(tied, tmp_path, capsys, monkeypatch):
    """A merge that forgets the tied head's last-stage copy (it must be read and compared)."""
    drop_mapping_groups(monkeypatch, tool("idefics2/mcore2hf.py"), lambda m: not m.mcore.endswith("output_layer.weight"))
    assert mcore2hf(tied / "mg", tmp_path / "out") == 1
    line = error_line(capsys)
    assert "tensor language_model.output_layer.weight of " in line and "mp_rank_00_001 was used 0 times" in line, line
    assert_nothing_written(tmp_path, "out")


def test_compose_refuses_a_source_tensor_left_unread(tmp_path, capsys, monkeypatch):
    module = tool("idefics2_llama3/compose.py")
    real = module.progress
    monkeypatch.setattr(module, "progress", lambda items, **kw: [(n, s) for n, s in real(items, **kw) if n != "model.text_model.norm.weight"])
    save_llama(tmp_path / "llama")
    save_siglip(tmp_path / "siglip")
    assert compose(tmp_path / "llama", tmp_path / "siglip", tmp_path / "out") == 1
    assert f"source tensor model.norm.weight of {tmp_path / 'llama'} was used 0 times instead of once" in error_line(capsys)
    assert_nothing_written(tmp_path, "out")
