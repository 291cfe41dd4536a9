"""Bad input ends in one clear `error:` line naming the culprit, and nothing partial is written."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from megatron_patch.checkpoint import RELEASE, CheckpointError, read_tracker, write_tracker
from tests.checkpoint.fixtures import idefics2_config, save_idefics2, tool


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny HF checkpoint and its Megatron conversion at TP=2 x PP=2."""
    root = tmp_path_factory.mktemp("good")
    save_idefics2(root / "hf", idefics2_config("mistral"), seed=0)
    assert hf2mcore(root / "hf", root / "mg", 2, 2) == 0
    return root


def hf2mcore(src, dst, tp=1, pp=1, *extra):
    return tool("idefics2/hf2mcore.py").main([
        "--load-path", str(src), "--save-path", str(dst), "--target-tensor-model-parallel-size", str(tp),
        "--target-pipeline-model-parallel-size", str(pp), *extra,
    ])


def mcore2hf(src, dst, *extra):
    return tool("idefics2/mcore2hf.py").main(["--load-path", str(src), "--save-path", str(dst), *extra])


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1, err
    return err[0]


def assert_nothing_written(parent, name):
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}")]
    assert leftovers == [], leftovers


def copy_hf(good, tmp_path):
    shutil.copytree(good / "hf", tmp_path / "hf")
    return tmp_path / "hf"


# ------------------------------------------------------------------ hf2mcore


def test_missing_weights(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    (src / "model.safetensors").unlink()
    assert hf2mcore(src, tmp_path / "mg") == 1
    assert "has neither model.safetensors nor model.safetensors.index.json" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_corrupt_safetensors(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert hf2mcore(src, tmp_path / "mg") == 1
    assert "corrupt safetensors file" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_failure_mid_conversion_leaves_nothing(good, tmp_path, capsys, monkeypatch):
    """A read that fails after rank files were written (disk error, truncated copy): no trace left."""
    from megatron_patch.checkpoint.hf_files import HFWeightsReader

    real_get, calls = HFWeightsReader.get, []

    def flaky_get(self, name):
        calls.append(name)
        if len(calls) == 40:
            raise CheckpointError(f"cannot read {name} from {self.hf_dir}: simulated I/O error")
        return real_get(self, name)

    monkeypatch.setattr(HFWeightsReader, "get", flaky_get)
    assert hf2mcore(good / "hf", tmp_path / "deep" / "mg", 2, 2, "--memory-budget", "1KB") == 1
    assert "simulated I/O error" in error_line(capsys)
    assert_nothing_written(tmp_path / "deep", "mg")


def test_index_names_a_missing_shard(good, tmp_path, capsys):
    src = copy_hf(good, tmp_path)
    names = list(load_file(str(src / "model.safetensors")))
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names[1:]}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert hf2mcore(src, tmp_path / "mg") == 1
    assert "model-00002-of-00002.safetensors is missing" in error_line(capsys)


def test_config_that_is_not_idefics2(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4).save_pretrained(str(tmp_path / "llama"))
    assert hf2mcore(tmp_path / "llama", tmp_path / "mg") == 1
    assert "is a 'llama' config, not Idefics2" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "--target-tensor-model-parallel-size 3 does not divide the vision num_attention_heads (4)"),
    (4, 1, "--target-tensor-model-parallel-size 4 does not divide the perceiver num_key_value_heads (2)"),
    (1, 3, "the 4 LLM layers do not split evenly over --target-pipeline-model-parallel-size 3"),
])
def test_layout_that_does_not_fit(good, tmp_path, capsys, tp, pp, message):
    assert hf2mcore(good / "hf", tmp_path / "mg", tp, pp) == 1
    assert message in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_tp_not_dividing_text_query_groups(tmp_path, capsys):
    config = idefics2_config("mistral")
    config.perceiver_config.num_key_value_heads = 4
    save_idefics2(tmp_path / "hf", config)
    assert hf2mcore(tmp_path / "hf", tmp_path / "mg", 4, 1) == 1
    assert "does not divide the text num_key_value_heads (2)" in error_line(capsys)


@pytest.mark.parametrize("change,message", [
    ("drop", "lacks tensor model.vision_model.post_layernorm.bias"),
    ("extra", "holds tensor model.extra.weight, which is not part of the Idefics2 model"),
    ("shape", "HF tensor model.vision_model.post_layernorm.bias has shape (5,), but config.json implies (32,)"),
])
def test_tensors_that_do_not_match_the_config(good, tmp_path, capsys, change, message):
    src = copy_hf(good, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.vision_model.post_layernorm.bias"
    if change == "drop":
        del tensors[name]
    elif change == "extra":
        tensors["model.extra.weight"] = tensors[name].clone()
    else:
        tensors[name] = tensors[name][:5].clone()
    save_file(tensors, str(src / "model.safetensors"))
    assert hf2mcore(src, tmp_path / "mg") == 1
    assert message in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_save_path_with_a_different_checkpoint(good, tmp_path, capsys):
    mg = tmp_path / "mg"
    shutil.copytree(good / "mg", mg)
    before = (mg / RELEASE / "mp_rank_00_000" / "model-00001.safetensors").read_bytes()
    save_idefics2(tmp_path / "other", idefics2_config("mistral"), seed=1)  # same shapes, other values

    assert hf2mcore(tmp_path / "other", mg, 2, 2) == 1
    assert "already holds a different Megatron checkpoint" in error_line(capsys)
    assert (mg / RELEASE / "mp_rank_00_000" / "model-00001.safetensors").read_bytes() == before
    assert sorted(p.name for p in mg.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]

    assert hf2mcore(tmp_path / "other", mg, 1, 1) == 1  # other layout: refused before any work
    assert "release/ is TP=2 x PP=2" in error_line(capsys)

    assert hf2mcore(tmp_path / "other", mg, 1, 1, "--overwrite") == 0
    assert not (mg / RELEASE / "mp_rank_00_000").exists() and (mg / RELEASE / "mp_rank_00").is_dir()


def test_save_path_with_training_iterations_or_other_files(good, tmp_path, capsys):
    mg = tmp_path / "mg"
    (mg / "iter_0000010").mkdir(parents=True)
    write_tracker(mg, 10)
    assert hf2mcore(good / "hf", mg) == 1
    assert "holds a training checkpoint (tracker names iteration 10)" in error_line(capsys)
    assert hf2mcore(good / "hf", mg, 1, 1, "--overwrite") == 0
    assert read_tracker(mg) == RELEASE and (mg / "iter_0000010").is_dir()  # training saves are kept

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert hf2mcore(good / "hf", tmp_path / "notes") == 1
    assert "is not empty and holds no Megatron checkpoint" in error_line(capsys)


# ------------------------------------------------------------------ mcore2hf


def test_megatron_checkpoint_problems(good, tmp_path, capsys):
    mg = tmp_path / "mg"
    shutil.copytree(good / "mg", mg)
    assert mcore2hf(mg, tmp_path / "out", "--iteration", "7") == 1
    assert "iteration 7, but" in error_line(capsys)

    (mg / "latest_checkpointed_iteration.txt").unlink()
    assert mcore2hf(mg, tmp_path / "out") == 1
    assert "has no latest_checkpointed_iteration.txt" in error_line(capsys)
    assert mcore2hf(mg, tmp_path / "out", "--iteration", "release") == 0

    rank = mg / RELEASE / "mp_rank_01_001" / "model-00001.safetensors"
    rank.write_bytes(rank.read_bytes()[:100])
    assert mcore2hf(mg, tmp_path / "out2", "--iteration", "release") == 1
    line = error_line(capsys)
    assert "corrupt safetensors file" in line and "mp_rank_01_001" in line, line
    assert_nothing_written(tmp_path, "out2")

    shutil.rmtree(mg / RELEASE / "mp_rank_01_001")
    assert mcore2hf(mg, tmp_path / "out2", "--iteration", "release") == 1
    assert "rank folder" in error_line(capsys)
    assert_nothing_written(tmp_path, "out2")


def test_missing_rank_tensor_is_named(good, tmp_path, capsys):
    mg = tmp_path / "mg"
    shutil.copytree(good / "mg", mg)
    rank = mg / RELEASE / "mp_rank_00_001"
    tensors = load_file(str(rank / "model-00001.safetensors"))
    name = "language_model.decoder.final_layernorm.weight"
    del tensors[name]
    save_file(tensors, str(rank / "model-00001.safetensors"))
    index = json.loads((rank / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (rank / "model.safetensors.index.json").write_text(json.dumps(index))
    assert mcore2hf(mg, tmp_path / "out") == 1
    assert f"mp_rank_00_001 lacks tensor {name}" in error_line(capsys)
    assert_nothing_written(tmp_path, "out")


def test_hf_save_path_refusals(good, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert mcore2hf(good / "mg", tmp_path / "notes", "--overwrite") == 1
    assert "holds no HF checkpoint" in error_line(capsys)
    assert (tmp_path / "notes" / "todo.txt").is_file()

    other = tmp_path / "other"
    save_idefics2(other, idefics2_config("llama"))
    assert mcore2hf(good / "mg", other) == 1
    assert "already holds a different HF checkpoint (config.json differs)" in error_line(capsys)

    same_config = tmp_path / "same"
    save_idefics2(same_config, idefics2_config("mistral"), seed=5)  # same config, other weights
    assert mcore2hf(good / "mg", same_config) == 1
    assert "already holds a different HF checkpoint" in error_line(capsys)
    assert mcore2hf(good / "mg", same_config, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
