"""Perceiver KV heads replicated over tensor-parallel ranks when TP exceeds them.

idefics2-8b's perceiver has 16 query heads and 4 KV heads and is trained at TP 8: with TP > KV
heads each TP rank holds the one KV head its query heads use (rank r holds group r // copies,
copies = TP / KV heads), as vLLM and Megatron-Bridge do. The copies of one HF KV head must stay
identical through training:

- gradients: each copy only sees its own ranks' query heads, so after megatron-core's grad
  finalisation `sum_copy_grads` sums the copies of each group (all-gather over the TP group, each
  rank adds its group's copies in rank order: every copy gets the same bits, the full gradient);
- grad norm: megatron-core counts a parameter when `tensor_model_parallel` is True or on TP rank 0
  only; `mark_copy` sets it on the first copy of each group alone, so each HF weight counts once;
- init: `copy_from_primary` gives every copy the first copy's random values (loading writes each
  copy from the one HF head through the weight mapping);
- optimizer state follows: same weights and same gradients give the same moments.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

COPIES_ATTR = "kv_copies"
"""Parameter attribute: how many TP ranks hold a copy of this KV weight (absent: not replicated)."""


def kv_copies(groups: int, tp: int) -> int:
    """TP ranks holding each KV group: 1 when TP divides the groups, TP / groups when it exceeds them."""
    return tp // groups if tp > groups else 1


def groups_per_rank(groups: int, tp: int) -> int:
    return max(groups // tp, 1)


def mark_copy(weight: torch.nn.Parameter, copies: int, tp_rank: int) -> None:
    """Tag a replicated KV weight; only the first copy of a group counts as tensor-parallel, so the
    grad norm and parameter counts take each HF weight once (the others look like TP duplicates)."""
    setattr(weight, COPIES_ATTR, copies)
    weight.tensor_model_parallel = tp_rank % copies == 0
    weight.partition_dim, weight.partition_stride = 0, 1


def replicated_params(module) -> list:
    return [p for p in module.parameters() if getattr(p, COPIES_ATTR, 1) > 1]


def _comm_device() -> torch.device:
    # NCCL only moves GPU tensors; gloo works on CPU ones.
    if dist.get_backend(parallel_state.get_tensor_model_parallel_group()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_copies(tensors: list[torch.Tensor], copies: list[int]) -> list[list[torch.Tensor]]:
    """For each tensor (replicated over `copies` ranks), its group's copies on every TP rank, in rank
    order, on the communication device."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    device = _comm_device()
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(device)
    gathered = [torch.empty_like(flat) for _ in range(tp)]
    dist.all_gather(gathered, flat, group=group)
    out = []
    offset = 0
    for t, n in zip(tensors, copies):
        first = rank // n * n
        out.append([g[offset:offset + t.numel()].view(t.shape) for g in gathered[first:first + n]])
        offset += t.numel()
    return out


@torch.no_grad()
def copy_from_primary(weights: list) -> None:
    """Give every copy the values of its group's first copy (after a random init). Collective over TP."""
    if not weights:
        return
    for weight, copies in zip(weights, _group_copies(weights, [getattr(w, COPIES_ATTR) for w in weights])):
        weight.copy_(copies[0])


def _grad(param) -> torch.Tensor:
    # megatron-core DDP accumulates into `main_grad`; without DDP it is `.grad`.
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


@torch.no_grad()
def sum_copy_grads(model_chunks) -> None:
    """Sum the gradients of each KV group's copies, in place on every copy. Collective over TP; call
    it on every TP rank after the DP reduction (with the distributed optimizer each rank's own shard
    of the buffer is right: TP ranks share one buffer layout)."""
    params = [p for chunk in model_chunks for p in replicated_params(chunk) if p.requires_grad]
    if not params:
        return
    grads = [_grad(p) for p in params]
    for grad, copies in zip(grads, _group_copies(grads, [getattr(p, COPIES_ATTR) for p in params])):
        total = copies[0].clone()
        for other in copies[1:]:  # the same order on every rank: the copies get the same bits
            total += other
        grad.copy_(total)
