"""A peft LoRA adapter on transformers' tiny Idefics2 (the reference) and per-rank bodies that load it
into the Megatron model with `--lora-load`'s code (run on N gloo ranks by the distributed harness)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.lora import add_lora
from megatron_patch.models.idefics2.peft_adapter import gather_adapter_tensors, load_peft_adapter, read_adapter_settings
from megatron_patch.platform import init_distributed
from megatron_patch.testing.parity import hf_outputs, megatron_outputs, random_inputs
from megatron_patch.training.freezing import freeze_base_for_lora
from tests.models.idefics2_cases import _wrap_ddp, build_from_hf, tiny_hf_model, train_micro_batch

TEXT = "mistral"
# peft's target_modules selecting the language model's projections only: a list of names would also
# select the perceiver's and the connector's q/k/v/o/gate/up/down projections.
TEXT_MODEL_TARGETS = r".*text_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Some projections of each fused linear only (k of qkv, gate of fc1 and down without adapters).
SOME_TARGETS = r".*text_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|v_proj|o_proj|up_proj)"


def save_peft_adapter(folder, rank: int = 4, alpha: float = 12.0, seed: int = 5, targets: str = TEXT_MODEL_TARGETS,
                      hf_model=None) -> None:
    """A peft adapter whose A and B are both random (B non-zero: it changes the output), saved by peft, on
    `hf_model` (default: the tiny model of these cases)."""
    from peft import LoraConfig, get_peft_model

    if hf_model is None:
        _, hf_model = tiny_hf_model(TEXT, False)
    peft_model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.15)
    peft_model.save_pretrained(str(folder))


def peft_reference(folder) -> dict:
    """Logits, loss and adapter gradients (by peft's saved key) of peft + transformers."""
    from peft import PeftModel

    config, hf_model = tiny_hf_model(TEXT, False)
    model = PeftModel.from_pretrained(hf_model, str(folder), is_trainable=True)
    inputs = random_inputs(config, batch_size=2, num_images=2, text_tokens=12, seed=7)
    logits = hf_outputs(model.base_model.model, inputs)["logits"]
    batch = random_inputs(config, batch_size=2, num_images=2, seed=11)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                pixel_attention_mask=batch["pixel_attention_mask"], labels=batch["input_ids"])
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            grads[name.replace(".default.", ".")] = param.grad.detach().clone()
    return {"logits": logits, "loss": float(out.loss), "grads": grads}


def _model_with_adapter(folder, tp: int, pp: int, **options):
    init_distributed(tp, pp, seed=1234)
    config, hf_model = tiny_hf_model(TEXT, False)
    opts = ParallelOptions(tp, pp, **options)
    model = build_from_hf(config, hf_model, opts)
    settings = read_adapter_settings(folder, config)
    add_lora(model, settings, opts, config)
    load_peft_adapter(model, folder, settings, config, opts)
    freeze_base_for_lora(model)
    return config, model


def lora_logits_case(folder, tp: int, pp: int, **options):
    """Megatron logits with the peft adapter at tp x pp (on rank 0)."""
    config, model = _model_with_adapter(folder, tp, pp, **options)
    inputs = random_inputs(config, batch_size=2, num_images=2, text_tokens=12, seed=7)
    ours = megatron_outputs([model.eval()], inputs, config.text_config.vocab_size)
    return None if ours is None else ours["logits"]


def lora_loss_and_grads_case(folder, tp: int, pp: int, **options):
    """(loss, {peft key: full adapter gradient}, trainable names) at tp x pp through DDP (on rank 0)."""
    config, model = _model_with_adapter(folder, tp, pp, **options)
    opts = ParallelOptions(tp, pp, **options)
    chunk = _wrap_ddp(model)
    loss = train_micro_batch(chunk, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    mine = (loss, parallel_state.get_tensor_model_parallel_rank(),
            {k: g for k, (_, g) in gather_adapter_tensors(model, config, opts).items()}, trainable)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    loss = next(part[0] for part in gathered if part[0] is not None)
    return loss, assemble_adapter_grads(gathered, tp), sorted({n for part in gathered for n in part[3]})


def assemble_adapter_grads(gathered, tp: int) -> dict:
    """Full gradients from TP shards: column-parallel bases split B's rows, row-parallel ones A's
    columns; the replicated tensor must be the same on every TP rank."""
    by_key = {}
    for _, tp_rank, grads, _ in gathered:
        for key, grad in grads.items():
            by_key.setdefault(key, {})[tp_rank] = grad
    out = {}
    for key, shards in by_key.items():
        parts = [shards[r] for r in range(tp)]
        projection, ab = key.split(".")[-3], key.split(".")[-2][-1]
        kind = "row" if projection in ("o_proj", "down_proj", "out_proj", "fc2") else "column"
        if (kind, ab) == ("column", "B"):
            out[key] = torch.cat(parts, dim=0)
        elif (kind, ab) == ("row", "A"):
            out[key] = torch.cat(parts, dim=1)
        else:
            for part in parts[1:]:
                assert torch.allclose(part, parts[0], atol=1e-6), f"{key}: TP copies of a replicated grad differ"
            out[key] = parts[0]
    return out
