"""The reference of LoRA training: peft + transformers' own SGD steps on the batches our loader makes.

Only the batches come from our code: the training loader built as a run builds it (one DP rank with
the whole global batch as its micro-batch: the data order is global, so it holds the same samples
as any split), finished by `micro_batches.model_inputs` (pixels normalised as the model gets them).
transformers' Idefics2 with peft's adapter runs the forward and backward; the loss is ours: the mean
over the loss tokens of the global batch, from transformers' logits with our (shifted) labels.
"""
from __future__ import annotations

from dataclasses import replace

import torch


def global_batches(flags: list, iters: int) -> list:
    """(model inputs, loss mask) of each of the first `iters` global batches of a run with `flags`."""
    from megatron_patch.data.collate import Collator
    from megatron_patch.data.encoder import encoder_from_settings
    from megatron_patch.data.loader import build_train_valid_loaders
    from megatron_patch.training.arguments import build_parser, validate_args
    from megatron_patch.training.micro_batches import model_inputs
    from megatron_patch.training.settings import data_settings

    args = build_parser().parse_args(flags + ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"])
    validate_args(args, 1)
    settings = replace(data_settings(args), micro_batch_size=args.global_batch_size, num_workers=0)
    encoder = encoder_from_settings(settings, args.tokenizer_dir)
    collate = Collator(settings.seq_length, encoder.pad_token_id, raw_pixels=True,
                       image_token_id=args.hf_config.image_token_id)
    loader = iter(build_train_valid_loaders(settings, encoder, collate, dp_rank=0, dp_size=1)[0])
    out = []
    for _ in range(iters):
        batch = next(loader)
        micro = model_inputs(batch, torch.float32, args.hf_config.vision_config.patch_size)
        out.append((dict(micro.inputs, attention_mask=batch["attention_mask"]), micro.loss_mask))
    return out


def _transformers_inputs(inputs: dict) -> dict:
    text = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}
    pixels = inputs["pixel_values"]
    if pixels.shape[1] == 0:
        return text
    # transformers finds padding images by their all-zero pixels; ours are marked: the same ones?
    assert torch.equal(pixels.flatten(2).ne(0).any(-1), inputs["image_mask"])
    return {**text, "pixel_values": pixels, "pixel_attention_mask": inputs["pixel_attention_mask"]}


def peft_sgd(hf_folder, adapter_folder, batches: list, lr: float) -> tuple[list, dict]:
    """(loss of each step, adapter state after the last) of plain SGD on peft's adapter parameters."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import Idefics2ForConditionalGeneration

    base = Idefics2ForConditionalGeneration.from_pretrained(hf_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_folder), is_trainable=True).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_" in n for n in params)  # peft trains its adapters only
    optimizer = torch.optim.SGD(params.values(), lr=lr, momentum=0.0, weight_decay=0.0)
    losses = []
    for inputs, loss_mask in batches:
        optimizer.zero_grad()
        logits = model(**_transformers_inputs(inputs)).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten(), reduction="none")
        loss = (per_token * loss_mask.flatten()).sum() / loss_mask.sum()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return losses, state
