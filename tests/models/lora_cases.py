"""A peft LoRA adapter on transformers' tiny Idefics2 (the reference) and per-rank bodies that load it
into the Megatron model with `--lora-load`'s code (run on N gloo ranks by the distributed harness)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.lora import add_lora
from megatron_patch.models.idefics2.peft_adapter import PEFT_PREFIX, load_peft_adapter, read_adapter_settings
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
                      hf_model=None, modules_to_save=None) -> None:
    """A peft adapter whose A and B are both random (B non-zero: it changes the output), saved by peft, on
    `hf_model` (default: the tiny model of these cases); with `modules_to_save`, their trained copies
    moved off the base's values."""
    from peft import LoraConfig, get_peft_model

    if hf_model is None:
        _, hf_model = tiny_hf_model(TEXT, False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, modules_to_save=modules_to_save)
    peft_model = get_peft_model(hf_model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.15)
            elif "modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
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
    for name, param in model.named_parameters():  # adapters and peft's trained copies of modules_to_save
        if param.requires_grad:
            grads[name.replace("modules_to_save.default.", "").replace(".default.", ".")] = param.grad.detach().clone()
    return {"logits": logits, "loss": float(out.loss), "grads": grads}


def _model_with_adapter(folder, tp: int, pp: int, **options):
    init_distributed(tp, pp, seed=1234)
    config, hf_model = tiny_hf_model(TEXT, False)
    opts = ParallelOptions(tp, pp, **options)
    model = build_from_hf(config, hf_model, opts)
    settings = read_adapter_settings(folder, config)
    add_lora(model, settings, opts, config)
    load_peft_adapter(model, folder, settings, config, opts)
    freeze_base_for_lora(model, settings, config, opts)
    return config, model, settings, opts


def lora_logits_case(folder, tp: int, pp: int, **options):
    """Megatron logits with the peft adapter at tp x pp (on rank 0)."""
    config, model, _, _ = _model_with_adapter(folder, tp, pp, **options)
    inputs = random_inputs(config, batch_size=2, num_images=2, text_tokens=12, seed=7)
    ours = megatron_outputs([model.eval()], inputs, config.text_config.vocab_size)
    return None if ours is None else ours["logits"]


def lora_loss_and_grads_case(folder, tp: int, pp: int, **options):
    """(loss, {peft key: full gradient of each adapter and module to save}, trainable names) at tp x pp
    through DDP (on rank 0)."""
    from megatron_patch.models.idefics2.model_loading import assemble_hf_tensors, local_tensors, pipeline_layout
    from megatron_patch.models.idefics2.weight_mapping import checkpoint_mappings

    config, model, settings, opts = _model_with_adapter(folder, tp, pp, **options)
    chunk = _wrap_ddp(model)
    loss = train_micro_batch(chunk, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    stage, tp_rank = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    grads = {(stage, tp_rank, name): g for name, g in local_tensors(model, opts, grads=True).items()}
    mine = (loss, grads, trainable)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    loss = next(part[0] for part in gathered if part[0] is not None)
    shards = {key: g for part in gathered for key, g in part[1].items()}
    mappings = checkpoint_mappings(config, settings.targets, settings.modules_to_save)
    full = assemble_hf_tensors(shards, config, pipeline_layout(config, opts), tp, mappings=mappings)
    return loss, {PEFT_PREFIX + name: g for name, g in full.items()}, sorted({n for part in gathered for n in part[2]})
