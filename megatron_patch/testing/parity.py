"""Run the Megatron Idefics2 and `transformers`' Idefics2 on the same batch and compare the numbers.

Used by the parity tool (toolkits/model_checkpoints_convertor/idefics2/check_hf_parity.py) and the tests.
Megatron outputs are collected on global rank 0: the vision and connector outputs come from the first
pipeline stage (TP rank 0), the logits from the last stage, gathered over TP and trimmed to the vocabulary.
Tensors in collectives live on the batch's device (`cuda:<current>` under NCCL, CPU under gloo); what
`gather_object` carries to rank 0 is moved to CPU first, so rank 0 compares on CPU whatever the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def use_true_fp32(on: bool = True) -> None:
    """fp32 comparisons in fp32 arithmetic: off turns TF32 back on for CUDA matmuls and cuDNN
    convolutions. cuDNN's default is TF32 (10-bit mantissa), which alone moves the vision tower's
    output by about 1e-3 on a GPU, far above the fp32 tolerance of 1e-4."""
    torch.backends.cuda.matmul.allow_tf32 = not on
    torch.backends.cudnn.allow_tf32 = not on


def random_inputs(hf_config, batch_size: int = 2, num_images: int = 2, text_tokens: int = 12, seed: int = 0) -> dict:
    """A batch of text with <image> blocks and 1..num_images images per sample of mixed sizes.

    Sample b has max(1, num_images - b) images so image padding (and its explicit mask) is exercised;
    every image has its own height and width, so pixel padding matters too.
    """
    g = torch.Generator().manual_seed(seed)
    v, t = hf_config.vision_config, hf_config.text_config
    latents = hf_config.perceiver_config.resampler_n_latents
    image_id = hf_config.image_token_id
    fake_id = getattr(hf_config, "fake_image_token_id", None)
    counts = [max(1, num_images - b) for b in range(batch_size)]
    p = v.patch_size
    sizes = [[(int(torch.randint(1, v.image_size // p + 1, (1,), generator=g)) * p - int(torch.randint(0, p // 2, (1,), generator=g)),
               int(torch.randint(1, v.image_size // p + 1, (1,), generator=g)) * p)
              for _ in range(c)] for c in counts]
    sizes = [[(max(h, p), max(w, p)) for h, w in s] for s in sizes]
    max_h = max(h for s in sizes for h, _ in s)
    max_w = max(w for s in sizes for _, w in s)
    pixel_values = torch.zeros(batch_size, num_images, 3, max_h, max_w)
    pixel_mask = torch.zeros(batch_size, num_images, max_h, max_w, dtype=torch.bool)
    image_mask = torch.zeros(batch_size, num_images, dtype=torch.bool)
    seq_len = text_tokens + num_images * (latents + 2)
    excluded = {image_id, fake_id}
    text_ids = [i for i in range(t.vocab_size) if i not in excluded]
    input_ids = torch.empty(batch_size, seq_len, dtype=torch.long)
    for b, size_list in enumerate(sizes):
        ids = []
        for i, (h, w) in enumerate(size_list):
            pixel_values[b, i, :, :h, :w] = torch.randn(3, h, w, generator=g)
            pixel_mask[b, i, :h, :w] = True
            image_mask[b, i] = True
            block = [image_id] * latents
            if fake_id is not None:
                block = [fake_id] + block + [fake_id]
            ids += [text_ids[int(j)] for j in torch.randint(0, len(text_ids), (2,), generator=g)] + block
        ids += [text_ids[int(j)] for j in torch.randint(0, len(text_ids), (seq_len - len(ids),), generator=g)]
        input_ids[b] = torch.tensor(ids)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_mask,
        "image_mask": image_mask,
    }


@torch.no_grad()
def hf_outputs(hf_model, inputs: dict) -> dict:
    """Vision output (real patches), connector output and logits of the transformers model."""
    captured = {}
    hooks = [
        hf_model.model.vision_model.register_forward_hook(
            lambda m, args, kwargs, out: captured.update(vision=out.last_hidden_state, patch_mask=kwargs["patch_attention_mask"]),
            with_kwargs=True,
        ),
        hf_model.model.connector.register_forward_hook(lambda m, args, out: captured.update(connector=out)),
    ]
    try:
        out = hf_model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
        )
    finally:
        for h in hooks:
            h.remove()
    mask = captured["patch_mask"].flatten(1)
    return {"vision": captured["vision"][mask], "connector": captured["connector"], "logits": out.logits}


def megatron_outputs(model_chunks: list, inputs: dict, vocab_size: int) -> Optional[dict]:
    """Forward pass through the pipeline; returns the outputs on global rank 0, None elsewhere.

    `inputs` may carry `position_ids` and `cu_seqlens` (packed rows) besides `random_inputs`' keys.
    """
    model = model_chunks[0]
    unwrapped = getattr(model, "module", model)
    captured = {}
    hooks = []
    if parallel_state.is_pipeline_first_stage():
        def on_vision(m, args, out):
            captured["vision"] = out[args[1].flatten(1)]

        hooks.append(unwrapped.vision_model.register_forward_hook(on_vision))
        hooks.append(unwrapped.connector.register_forward_hook(lambda m, args, out: captured.update(connector=out)))
    batch_size, seq_len = inputs["input_ids"].shape
    device = inputs["input_ids"].device  # the batch is on the compute device (cuda:<current> under NCCL)
    position_ids = inputs.get("position_ids", torch.arange(seq_len, device=device).unsqueeze(0).expand(batch_size, -1))

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        out = chunk(
            batch["input_ids"], position_ids, batch["pixel_values"], batch["pixel_attention_mask"], batch["image_mask"],
            cu_seqlens=batch.get("cu_seqlens"),
        )

        def collect(output, non_loss_data=False):
            return output

        return out, collect

    try:
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([inputs]),
            model=model_chunks,
            num_microbatches=1,
            seq_length=seq_len,
            micro_batch_size=batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        for h in hooks:
            h.remove()
    mine = {}
    if parallel_state.is_pipeline_first_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        mine.update(captured)
    if parallel_state.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(results[0])[..., :vocab_size]
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            mine["logits"] = logits
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object({k: v.detach().cpu() for k, v in mine.items()}, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def max_abs_diffs(ours: dict, reference: dict) -> dict:
    """Max |ours - reference| per component (vision, connector, logits)."""
    return {k: float((ours[k].double() - reference[k].double()).abs().max()) for k in ("vision", "connector", "logits")}
