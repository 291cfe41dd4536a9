"""The start-up table of trainable / frozen parameters per component, at TP2 x PP2, equals the HF
model's element counts: TP-replicated tensors (norms, biases) once, a tied LM head once."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs

pytestmark = pytest.mark.distributed


TP = 2
FREEZE_FLAGS = {"llm": "--freeze-llm", "vision": "--freeze-clip-vision-tower", "connector": "--freeze-perceiver"}


def _model_config(inputs, folder, tied: bool):
    """The tiny HF model's config and tokenizer files (no weights), its head tied or not."""
    shutil.copytree(inputs["hf"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = tied
    path.write_text(json.dumps(config))
    return path


def _hf_counts(config_path) -> dict:
    """{component: elements} of the HF model built by transformers from the config."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(Idefics2Config.from_pretrained(config_path.parent))
    counts = {"vision": 0, "connector": 0, "llm": 0}
    for name, param in model.named_parameters():  # a tied head is listed once
        component = "vision" if name.startswith("model.vision_model.") else \
            "connector" if name.startswith("model.connector.") else "llm"
        counts[component] += param.numel()
    return counts


def _startup_table(flags: list):
    """(the parameter table of the built run, what rank 0 printed while building it)."""
    from megatron_patch.models.idefics2.model_loading import unwrap
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.freezing import parameter_table

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ctx = build_training(parse_args(flags))
    return parameter_table(unwrap(ctx.model), ctx.device), printed.getvalue()


@pytest.mark.parametrize("tied, frozen", [(False, ()), (True, ("llm", "connector"))],
                         ids=["untied-none-frozen", "tied-llm+connector-frozen"])
def test_parameter_table_at_tp2_pp2_counts_each_hf_parameter_once(tmp_path, tied, frozen):
    from megatron_patch.training.freezing import format_parameter_table

    inputs = training_inputs()
    config_path = _model_config(inputs, tmp_path / "model", tied)
    flags = train_flags(inputs, tmp_path / "run", tp=TP, pp=2, extra=[FREEZE_FLAGS[c] for c in frozen])
    flags[flags.index("--load"): flags.index("--load") + 2] = ["--model-config", str(config_path)]
    results = run_distributed(4, _startup_table, flags)
    counts = _hf_counts(config_path)
    # As built, the vocabulary is padded to a multiple of TP: the embedding (and an untied head)
    # holds those rows too, and the table counts them.
    text = json.loads(config_path.read_text())["text_config"]
    counts["llm"] += (-text["vocab_size"] % TP) * text["hidden_size"] * (1 if tied else 2)
    want = {c: (0, n, 0) if c in frozen else (n, 0, 0) for c, n in counts.items()}
    assert [table for table, _ in results] == [want] * len(results)  # every rank got the model-wide totals
    assert format_parameter_table(want) in results[0][1]  # what the run printed at start-up
