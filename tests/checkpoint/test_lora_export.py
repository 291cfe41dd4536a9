"""A LoRA checkpoint out to Hugging Face: `mcore2hf --adapter-only` writes a peft folder that
`PeftModel.from_pretrained` loads on transformers' Idefics2 with exactly the checkpoint's adapters (and
that --lora-load reads back); `mcore2hf` without it writes the base with the adapters merged, whose
logits equal peft's own merged model's. Wrong inputs are refused in one line."""
from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoint.cli import assert_nothing_written, error_line, mcore2hf
from tests.distributed_harness import run_distributed
from tests.models.lora_cases import save_peft_adapter
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import train

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run at TP2 (steps from a peft adapter whose A and B are random, the modality projection
    trained fully beside it) saved, on the fixture's tiny base: its checkpoint folder."""
    from transformers import Idefics2ForConditionalGeneration

    root = tmp_path_factory.mktemp("lora_export")
    inputs = training_inputs()
    start = root / "start_adapter"
    save_peft_adapter(start, hf_model=Idefics2ForConditionalGeneration.from_pretrained(inputs["hf"]),
                      modules_to_save=["modality_projection"])
    run_distributed(2, train, train_flags(inputs, root / "run", tp=2, iters=2, gbs=2,
                                          extra=["--lora-load", str(start)]))
    return inputs, root / "run"


def _hf_model(inputs):
    from transformers import Idefics2ForConditionalGeneration

    return Idefics2ForConditionalGeneration.from_pretrained(inputs["hf"]).eval()


def _logits(model, config):
    from megatron_patch.testing.parity import random_inputs

    batch = random_inputs(config, batch_size=2, num_images=2, text_tokens=12, seed=3)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"]).logits


def test_adapter_only_export_loads_in_peft_with_the_checkpoints_adapters(lora_run, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from megatron_patch.checkpoint.layout import resolve_iteration
    from megatron_patch.checkpoint.reshard import ShardedCheckpoint
    from megatron_patch.models.idefics2.peft_adapter import read_adapter_settings

    inputs, run = lora_run
    out = tmp_path / "adapter"
    assert mcore2hf(run, out, "--adapter-only") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 12.0, "LORA")
    assert config["modules_to_save"] == ["modality_projection"]
    model = PeftModel.from_pretrained(_hf_model(inputs), str(out))
    loaded = get_peft_model_state_dict(model)
    source = ShardedCheckpoint(resolve_iteration(run, None)[1])
    saved = {name: source.hf_tensor(name) for m in source.mappings for name in m.hf}
    assert sorted(loaded) == sorted(f"base_model.model.{name}" for name in saved)  # nothing missing or extra
    for name, tensor in saved.items():
        assert torch.equal(loaded[f"base_model.model.{name}"], tensor), name
    # peft selected the same modules as the adapters' keys (the regex target_modules): the text model's only.
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert wrapped and all(".text_model.layers." in n for n in wrapped)
    assert read_adapter_settings(out, _hf_model(inputs).config).targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")  # --lora-load reads it back


def test_merged_export_equals_peft_merged_model(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import Idefics2ForConditionalGeneration

    inputs, run = lora_run
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert mcore2hf(run, adapter, "--adapter-only") == 0
    assert mcore2hf(run, merged) == 0
    ours = Idefics2ForConditionalGeneration.from_pretrained(merged).eval()
    theirs = PeftModel.from_pretrained(_hf_model(inputs), str(adapter)).merge_and_unload().eval()
    base = _hf_model(inputs)
    got, want, before = (_logits(m, ours.config) for m in (ours, theirs, base))
    assert (got - want).abs().max() < 1e-5
    assert (want - before).abs().max() > 1e-2  # the adapters change the model: the comparison is not vacuous
    adapted = ("text_model.layers", "modality_projection")  # adapters merged; the module trained fully replaced
    untouched = [n for n in base.state_dict() if not any(a in n for a in adapted) or "norm" in n]
    assert any("modality_projection" in n and not torch.equal(ours.state_dict()[n], t)
               for n, t in base.state_dict().items())
    state = ours.state_dict()
    assert all(torch.equal(state[n], base.state_dict()[n]) for n in untouched)  # only adapted weights change


def test_lora_export_refusals_are_one_line(lora_run, tmp_path, capsys):
    inputs, run = lora_run
    assert mcore2hf(inputs["mg"], tmp_path / "a", "--adapter-only") == 1
    assert "is a full checkpoint, not a LoRA one" in error_line(capsys)
    assert_nothing_written(tmp_path, "a")
    info_path = next(run.glob("iter_*")) / "checkpoint_info.json"
    info = json.loads(info_path.read_text())
    moved = tmp_path / "nowhere"
    assert mcore2hf(run, tmp_path / "b", "--lora-base", str(moved)) == 1
    assert "is missing" in error_line(capsys)
    assert_nothing_written(tmp_path, "b")
    assert info["lora"]["base"]["path"] == str(inputs["mg"].resolve())
