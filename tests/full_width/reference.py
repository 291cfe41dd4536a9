"""The transformers side of the full-width checks, built once per config in one worker process.

A real config with only the depth cut (`reference_configs.depth_cut`) is built by transformers with
seeded weights and written as an HF checkpoint (streamed tensor by tensor, `HFShardWriter`), which
is what the Megatron ranks load, one rank at a time, and what `hf2mcore` converts. transformers then
gives the reference logits of one batch and the loss and gradients of one training micro-batch; the
gradients are written to disk as the backward produces them (a hook per parameter) so that no
process ever holds the model's weights and gradients at once. The reference logits come from a
forward without autograd, the training forward runs with it: their largest difference is the floor
any parity tolerance must respect (transformers against itself).
"""
from __future__ import annotations

import copy
import gc
from pathlib import Path

import torch

from megatron_patch.checkpoint.safetensors_io import release_freed_memory
from megatron_patch.conversion.hf_files import HFShardWriter
from megatron_patch.models.idefics2.reference_configs import depth_cut, reference_config
from megatron_patch.testing.parity import random_inputs

DEPTH = dict(vision_layers=1, perceiver_depth=1, text_layers=2)
IMAGE_PX = 56  # images of at most 4 x 4 patches: every width is real, the batch stays CPU-sized
WEIGHT_SCALE = 0.02


LLAMA3_CUT_VOCAB = 32771
"""Idefics2-Llama3's vocabulary in this group unless FULL_WIDTH_LLAMA3_VOCAB=full: with its real 128,260
rows the depth-cut model is 1.8 B parameters, and weights plus DDP gradients over the 8 ranks of the
TP 8 step (14.6 GB) exceed the group's ~12 GiB. 32,771 is not a multiple of TP x 128 nor of 8, so the
padded, masked vocabulary is still exercised; every other width is real."""


def full_width_config(name: str, text_layers: int = 2):
    import os

    config = depth_cut(reference_config(name), DEPTH["vision_layers"], DEPTH["perceiver_depth"], text_layers)
    if name == "idefics2-llama3-8b" and os.environ.get("FULL_WIDTH_LLAMA3_VOCAB") != "full":
        vocab = config.text_config.vocab_size = LLAMA3_CUT_VOCAB
        config.fake_image_token_id, config.image_token_id = vocab - 4, vocab - 3  # compose's order, at the end
    config._attn_implementation = "sdpa"
    for sub in (config.vision_config, config.perceiver_config, config.text_config):
        sub._attn_implementation = "sdpa"
    return config


def batch(config) -> dict:
    """2 samples of one image each (different sizes, at most IMAGE_PX pixels a side) and 10 text tokens."""
    small = copy.deepcopy(config)
    small.vision_config.image_size = IMAGE_PX  # bounds the random image sizes only
    return random_inputs(small, batch_size=2, num_images=1, text_tokens=10, seed=7)


@torch.no_grad()
def fill_weights(model, seed: int = 0, scale: float = WEIGHT_SCALE) -> None:
    """Every tensor drawn in place from one seeded generator: N(1, scale) for norm gains, N(0, scale)
    otherwise (`tiny.randomize_weights`' values, without its copies: 1-2 B parameters in seconds)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        base = 1.0 if "norm" in name and param.dim() == 1 and "bias" not in name else 0.0
        param.normal_(base, scale, generator=g)


def _write(folder: Path, tensors: dict) -> HFShardWriter:
    plan = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    return HFShardWriter(folder, plan, max_shard_bytes=2 * 10**9)


def _forward(model, inputs, labels: bool):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                 labels=inputs["input_ids"] if labels else None)


def build_reference(name: str, folder: str, text_layers: int = 2) -> dict:
    """Write folder/hf (the checkpoint) and folder/grads (its gradients, HF names) and folder/logits.pt
    (the logits of `batch` without autograd); return the loss, the floor (max |logits| difference
    between that forward and the training forward: transformers against itself when only the kernels
    it picks with and without autograd differ) and the logits' scale."""
    from transformers import Idefics2ForConditionalGeneration
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    config = full_width_config(name, text_layers)
    with no_init_weights():  # every weight is drawn by fill_weights next
        model = Idefics2ForConditionalGeneration(config).eval()
    fill_weights(model)
    writer = _write(folder / "hf", model.state_dict())
    for param_name, tensor in model.state_dict().items():
        writer.add(param_name, tensor)
    writer.close()
    config.save_pretrained(str(folder / "hf"))
    inputs = batch(config)
    torch.set_num_threads(2)
    with torch.no_grad():
        reference = _forward(model, inputs, labels=False).logits
    torch.save(reference, folder / "logits.pt")
    grads = _write(folder / "grads", dict(model.named_parameters()))

    def stream(param_name):
        def hook(param):
            grads.add(param_name, param.grad)
            param.grad = None
        return hook

    handles = [p.register_post_accumulate_grad_hook(stream(n)) for n, p in model.named_parameters()]
    out = _forward(model, inputs, labels=True)
    out.loss.backward()
    for handle in handles:
        handle.remove()
    grads.close()
    loss, logits = float(out.loss.detach()), out.logits.detach()
    del model, out
    gc.collect()
    release_freed_memory()  # this pool process stays alive for the rest of the session
    return {"loss": loss, "floor": float((logits - reference).abs().max()),
            "logit_max": float(reference.abs().max()), "logit_std": float(reference.std())}
