"""A LoRA run through the entry point's code at TP2: the start-up table counts peft's adapter elements
as the only trainable ones, the optimizer holds only adapters, the base stays bit-identical and the
adapters learn."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs

pytestmark = pytest.mark.distributed

RANK = 4


def _lora_flags(inputs, tmp_path):
    flags = train_flags(inputs, tmp_path / "unused", tp=2, iters=3, gbs=2)
    at = flags.index("--save")
    del flags[at:at + 2]  # LoRA checkpoints come later: --save is refused with LoRA
    return flags + ["--finetune", "--lora-rank", str(RANK), "--lora-alpha", "8", "--optimizer", "sgd",
                    "--metrics-jsonl", str(tmp_path / "metrics.jsonl")]


def _peft_adapter_elements(hf_folder) -> int:
    """Elements of peft's adapters on transformers' Idefics2 text model at rank RANK (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    from tests.models.lora_cases import TEXT_MODEL_TARGETS

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(Idefics2Config.from_pretrained(hf_folder))
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, target_modules=TEXT_MODEL_TARGETS))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def lora_run(flags):
    from megatron_patch.models.idefics2.model_loading import unwrap
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.freezing import parameter_table
    from megatron_patch.training.loop import pretrain

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ctx = build_training(parse_args(flags))
    model = unwrap(ctx.model)
    table = parameter_table(model, ctx.device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    in_optimizer = set()
    for optimizer in getattr(ctx.optimizer, "chained_optimizers", [ctx.optimizer]):
        # The distributed optimizer's groups hold fp32 shards; it maps the model's parameters it steps.
        held = getattr(optimizer, "model_param_group_index_map", None)
        in_optimizer |= {id(p) for p in held} if held is not None else \
            {id(p) for group in optimizer.param_groups for p in group["params"]}
    optimized = sorted(n for n, p in model.named_parameters() if id(p) in in_optimizer)
    pretrain(ctx)
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    result = (table, printed.getvalue(), optimized, changed, trainable, _replicas_out_of_sync(model))
    return result if dist.get_rank() == 0 else None


def _replicas_out_of_sync(model) -> list:
    """Adapter tensors every TP rank holds whole (column-parallel A, row-parallel B) that differ between
    the TP ranks after training (dropout masks or gradients that disagree would show here)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = []
    for name, param in model.named_parameters():
        if param.requires_grad and not getattr(param, "tensor_model_parallel", False):
            copies = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, param.detach().contiguous(), group=group)
            if not all(torch.equal(c, copies[0]) for c in copies):
                out.append(name)
    return out


@pytest.mark.parametrize("extra", [[], ["--lora-dropout", "0.2", "--sequence-parallel"], ["--lora-dropout", "0.2"],
                                   ["--use-distributed-optimizer", "--optimizer", "adam", "--lora-alpha", "16",
                                    "--overlap-grad-reduce", "--overlap-param-gather"]],
                         ids=["plain", "dropout-sp", "dropout", "distributed-optimizer-overlap"])
def test_lora_run_trains_adapters_only(tmp_path, extra):
    inputs = training_inputs()
    table, printed, optimized, changed, trainable, out_of_sync = run_distributed(
        2, lora_run, _lora_flags(inputs, tmp_path) + extra)[0]
    assert out_of_sync == []
    assert table["llm"].adapters == _peft_adapter_elements(inputs["hf"])
    assert all(counts.trained == 0 and counts.frozen > 0 for counts in table.values())  # the base is frozen
    assert "LoRA adapters" in printed and f"LoRA: rank {RANK}, alpha" in printed
    assert trainable and all(".lora_" in n for n in trainable)
    assert optimized == trainable  # optimizer state for adapters only
    # The base is bit-identical; every A learns (B starts at zero, so B learns from the first step).
    assert changed and all(".lora_" in n for n in changed)
    assert {n for n in trainable if "linear_in" in n} <= set(changed)
    losses = [json.loads(line)["lm_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "lm_loss" in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_lora_with_full_recompute_trains_as_without(tmp_path):
    # Recomputed layers get their input's grad requirement: the adapters must get the same gradients.
    from tests.training.runs import by_iteration, train

    inputs = training_inputs()
    base = _lora_flags(inputs, tmp_path) + ["--pipeline-model-parallel-size", "2", "--sequence-parallel"]
    recompute = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    values = {}
    for name, extra in (("plain", []), ("recompute", recompute)):
        metrics = tmp_path / f"{name}.jsonl"
        run_distributed(4, train, base + extra + ["--metrics-jsonl", str(metrics)])
        values[name] = {i: (r["lm_loss"], r["grad_norm"]) for i, r in by_iteration(metrics).items()}
    assert sorted(values["plain"]) == [1, 2, 3] and all(g > 0 for _, g in values["plain"].values())
    assert values["recompute"] == values["plain"]


def test_lora_modules_to_save_train_fully_beside_the_adapters(tmp_path):
    inputs = training_inputs()
    flags = _lora_flags(inputs, tmp_path) + ["--lora-modules-to-save", "connector"]
    table, printed, optimized, changed, trainable, out_of_sync = run_distributed(2, lora_run, flags)[0]
    assert out_of_sync == []
    assert table["connector"].trained > 0 and table["connector"].frozen == 0  # the whole connector trains
    assert table["vision"].trained == table["llm"].trained == 0
    assert "trained" in printed and "LoRA adapters" in printed
    saved = [n for n in trainable if ".lora_" not in n]
    assert saved and all(n.startswith("connector.") for n in saved)
    assert optimized == trainable  # optimizer state for adapters and the connector only
    assert set(changed) <= set(trainable) and set(saved) & set(changed)  # the connector learns; the rest is untouched
