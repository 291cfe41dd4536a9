"""Bad input ends in one clear `error:` line naming the culprit, and nothing partial is written."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from megatron_patch.checkpoint import RELEASE, CheckpointError, read_tracker, write_tracker
from megatron_patch.checkpoint.config_files import read_idefics2_config
from megatron_patch.conversion.tooling import run_tool
from megatron_patch.models.idefics2.weight_mapping import HF_EMBED_TOKENS, HF_LM_HEAD
from tests.checkpoint.cli import assert_nothing_written, error_line, hf2mcore, mcore2hf
from tests.checkpoint.fixtures import assert_bit_exact, idefics2_config, round_trip, save_idefics2

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny HF checkpoint and its Megatron conversion at TP=2 x PP=2."""
    root = tmp_path_factory.mktemp("good")
    save_idefics2(root / "hf", idefics2_config("mistral"), seed=0)
    assert hf2mcore(root / "hf", root / "mg", 2, 2) == 0
    return root


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
    from megatron_patch.conversion.hf_files import HFWeightsReader

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
    assert_nothing_written(tmp_path, "mg")


def test_config_that_is_not_idefics2(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4).save_pretrained(str(tmp_path / "llama"))
    assert hf2mcore(tmp_path / "llama", tmp_path / "mg") == 1
    assert "is a 'llama' config, not Idefics2" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_any_multi_line_error_is_printed_as_one_line(capsys):
    def body():
        raise OSError("cannot read x.safetensors:\n    disk gone")

    assert run_tool("sometool", body) == 1
    assert error_line(capsys) == "sometool: error: cannot read x.safetensors: disk gone"


def test_config_with_a_field_of_the_wrong_type(good, tmp_path, capsys):
    """transformers' message spans two lines; the tool's error stays one."""
    src = copy_hf(good, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = "four"
    (src / "config.json").write_text(json.dumps(config))
    assert hf2mcore(src, tmp_path / "mg") == 1
    line = error_line(capsys)
    assert "config.json is not a valid Idefics2 config" in line and "num_hidden_layers" in line, line
    assert_nothing_written(tmp_path, "mg")
    with pytest.raises(CheckpointError) as err:  # training reads configs without the tools' error printing
        read_idefics2_config(src)
    assert "\n" not in str(err.value) and "num_hidden_layers" in str(err.value)


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "--target-tensor-model-parallel-size 3 does not divide the vision num_attention_heads (4)"),
    (4, 1, "--target-tensor-model-parallel-size 4 does not divide the text num_key_value_heads (2)"),
    (1, 3, "the 4 LLM layers do not split evenly over --target-pipeline-model-parallel-size 3"),
])
def test_layout_that_does_not_fit(good, tmp_path, capsys, tp, pp, message):
    assert hf2mcore(good / "hf", tmp_path / "mg", tp, pp) == 1
    assert message in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_first_stage_layers_beyond_the_model(good, tmp_path, capsys):
    assert hf2mcore(good / "hf", tmp_path / "mg", 1, 2, "--target-decoder-first-pipeline-num-layers", "9") == 1
    assert "--target-decoder-first-pipeline-num-layers 9 must be between 1 and 3: the model has 4 LLM layers" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_tp_not_dividing_text_query_groups(tmp_path, capsys):
    config = idefics2_config("mistral")
    config.perceiver_config.num_key_value_heads = 4
    save_idefics2(tmp_path / "hf", config)
    assert hf2mcore(tmp_path / "hf", tmp_path / "mg", 4, 1) == 1
    assert "does not divide the text num_key_value_heads (2)" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


def test_tp_not_dividing_text_attention_heads(tmp_path, capsys):
    config = idefics2_config("mistral")
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 3, 1
    save_idefics2(tmp_path / "hf", config)
    assert hf2mcore(tmp_path / "hf", tmp_path / "mg", 2, 1) == 1
    assert "--target-tensor-model-parallel-size 2 does not divide the text num_attention_heads (3)" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


@pytest.mark.parametrize("head_equals_embedding", [True, False])
def test_tied_checkpoint_that_also_stores_the_head(tmp_path, capsys, head_equals_embedding):
    config = idefics2_config("mistral", tied=True)
    save_idefics2(tmp_path / "hf", config, seed=2)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert HF_LM_HEAD not in tensors  # transformers leaves a tied head out
    tensors[HF_LM_HEAD] = tensors[HF_EMBED_TOKENS].clone() + (0 if head_equals_embedding else 1e-3)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    if head_equals_embedding:  # accepted as redundant; the round trip gives back every tensor but it
        _, back = round_trip(tmp_path / "hf", tmp_path, 1, 2)
        assert_bit_exact(tmp_path / "hf", back, config)
        return
    assert hf2mcore(tmp_path / "hf", tmp_path / "mg", 1, 2) == 1
    assert f"ties the head to the embedding, but {HF_LM_HEAD} differs from {HF_EMBED_TOKENS}" in error_line(capsys)
    assert_nothing_written(tmp_path, "mg")


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
