"""Per-rank bodies of the full-width checks: the Megatron model at real widths loaded from the reference
checkpoint, compared with transformers' logits, gradients and one SGD step.

Memory: every rank reads only the HF tensors its part needs, and the ranks load one after another
(a full-width vocabulary tensor is read whole before it is split: 0.5-2 GB at a time, not 8x that).
Gradients and stepped weights are compared on each rank against its own shard of the reference
(`hf_to_mcore` of transformers' tensors), so no rank ever gathers the model.
"""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.checkpoint.safetensors_io import release_freed_memory
from megatron_patch.conversion.hf_files import HFWeightsReader
from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.layer_specs import module_to_canonical_name
from megatron_patch.models.idefics2.model import build_model
from megatron_patch.models.idefics2.model_loading import load_hf_weights, stage_mappings
from megatron_patch.models.idefics2.weight_mapping import hf_to_mcore
from megatron_patch.platform import init_distributed
from megatron_patch.testing.parity import megatron_outputs
from megatron_patch.training.loss import masked_loss_sum
from tests.full_width.reference import batch
from tests.models.idefics2_cases import _shifted
from tests.planning_cases import optimizer_args

SGD_LR = 1.0


def _release() -> None:
    """Free this pool process's model now: DDP and the config refer to each other (a cycle only the
    collector frees), then hand the freed heap back to the OS for the tests that follow."""
    gc.collect()
    release_freed_memory()


def _load_in_turns(folder: str, tp: int, pp: int):
    """(config, model part) of this rank, loaded from folder/hf one rank at a time."""
    from megatron_patch.checkpoint.config_files import read_idefics2_config

    config = read_idefics2_config(f"{folder}/hf")
    opts = ParallelOptions(tp, pp)
    model = build_model(config, opts, init_weights=False)
    reader = HFWeightsReader(f"{folder}/hf")
    for turn in range(dist.get_world_size()):
        if turn == dist.get_rank():
            load_hf_weights(model, reader.get, config, opts)
            release_freed_memory()
        dist.barrier()
    return config, opts, model


def logits_case(folder: str, tp: int, pp: int) -> float | None:
    """Max |logits - transformers' logits| on rank 0 (the vocabulary's real columns)."""
    init_distributed(tp, pp, seed=1234)
    torch.set_num_threads(1)
    config, _, model = _load_in_turns(folder, tp, pp)
    inputs = batch(config)
    ours = megatron_outputs([model.eval()], inputs, config.text_config.vocab_size)
    del model
    _release()
    if dist.get_rank() != 0:
        return None
    reference = torch.load(f"{folder}/logits.pt")
    return float((ours["logits"].double() - reference.double()).abs().max())


def _forward_backward(model, inputs):
    labels, loss_mask = _shifted(inputs)
    b, s = labels.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)

    def forward_step(data_iterator, chunk):
        x = next(data_iterator)
        per_token = chunk(x["input_ids"], position_ids, x["pixel_values"], x["pixel_attention_mask"], x["image_mask"],
                          labels=labels)
        return per_token, lambda out: masked_loss_sum(out, loss_mask)

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model], num_microbatches=1,
        seq_length=s, micro_batch_size=b, forward_only=False,
    )
    if not ps.is_pipeline_last_stage():
        return None
    loss_sum, tokens = (float(x) for x in reports[0]["lm loss"])
    return loss_sum / tokens


def _compare(model, mappings: dict, weights, grads, tp_rank: int, tp: int) -> dict:
    """{canonical name: (max |grad - reference shard|, max |reference grad shard|, max |weight - (w - lr g)
    shard|)} of this rank's tensors. HF tensors are memory-mapped; a shard of (w - lr g) is taken as
    shard(w) - lr shard(g) (the split rules only move values; padding rows are zero in both), so no
    full-size difference is ever made."""
    out = {}
    for name, param in model.named_parameters():
        m = mappings[module_to_canonical_name(name, False)]
        grad = hf_to_mcore(m, [grads.get(h) for h in m.hf], tp_rank, tp).double()
        grad_diff = float((param.main_grad.double() - grad).abs().max())
        stepped = hf_to_mcore(m, [weights.get(h) for h in m.hf], tp_rank, tp).double() - SGD_LR * grad
        out[m.mcore] = (grad_diff, float(grad.abs().max()), float((param.detach().double() - stepped).abs().max()))
        del grad, stepped
    return out


def grads_and_sgd_step_case(folder: str, tp: int, pp: int) -> dict:
    """Loss, every gradient and the weights after one SGD step (lr 1, no momentum, no clipping) through
    training's DDP, grad finalisation (which sums the perceiver's KV copies over TP) and optimizer,
    each compared on its rank with its shard of transformers' values: weights - lr x gradients.
    (The step leaves `main_grad` as it was: no weight decay, no clipping.)"""
    from megatron_patch.platform import get_device
    from megatron_patch.training.optimizer import build_optimizer, optimizer_step, wrap_ddp

    init_distributed(tp, pp, seed=1234)
    torch.set_num_threads(1)
    config, opts, model = _load_in_turns(folder, tp, pp)
    args = optimizer_args(distributed=False, bf16=False, optimizer="sgd", lr=SGD_LR)
    ddp = wrap_ddp(model, args)
    optimizer = build_optimizer(ddp, args)
    loss = _forward_backward(ddp, batch(config))
    outcome = optimizer_step(optimizer, True, 0.0, get_device())
    mappings = stage_mappings(config, opts, ps.get_pipeline_model_parallel_rank())
    weights, grads = HFWeightsReader(f"{folder}/hf"), HFWeightsReader(f"{folder}/grads")
    for turn in range(dist.get_world_size()):  # one rank at a time: a vocabulary shard is cut from the whole
        if turn == dist.get_rank():
            diffs = _compare(model, mappings, weights, grads, ps.get_tensor_model_parallel_rank(), tp)
            release_freed_memory()
        dist.barrier()
    del ddp, optimizer, model
    _release()
    return {"loss": loss, "updated": outcome.updated, "diffs": diffs}
