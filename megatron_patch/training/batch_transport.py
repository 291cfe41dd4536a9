"""Load each micro-batch once per model replica and send every rank only what it needs.

Only TP rank 0 of the first pipeline stage reads, decodes and encodes (`loads_data`). Each
micro-batch then travels in two broadcasts:
1. over the pipeline group of TP rank 0, the text part every stage needs (`PIPELINE_KEYS`: token
   ids and positions for the shapes, the packed-row boundaries for attention, the labels and loss
   mask for the last stage's loss);
2. over each stage's TP group, that stage's part (the first stage also gets the images).
Shapes vary between micro-batches (images, packed-row boundaries), so each broadcast first sends
a small description of the tensors. Bool tensors travel as uint8 (NCCL has no bool).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

PIPELINE_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "cu_seqlens", "max_seqlen")
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_mask")


def loads_data() -> bool:
    """Whether this rank runs a data loader: TP rank 0 of the first pipeline stage."""
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage()


def _broadcast(batch: Optional[dict], keys, src: int, group, device) -> dict:
    """Broadcast `keys` of `batch` (held by global rank `src`) to every rank of `group`."""
    if dist.get_world_size(group) == 1:
        return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    meta = [None]
    if dist.get_rank() == src:
        meta = [[(k, tuple(batch[k].shape), batch[k].dtype) for k in keys if k in batch]]
    dist.broadcast_object_list(meta, src=src, group=group, device=device)
    out = {}
    for key, shape, dtype in meta[0]:
        wire = torch.uint8 if dtype == torch.bool else dtype
        if dist.get_rank() == src:
            tensor = batch[key].to(device=device, dtype=wire).contiguous()
        else:
            tensor = torch.empty(shape, dtype=wire, device=device)
        if tensor.numel():  # e.g. a text-only micro-batch's [B, 0, 3, 0, 0] images
            dist.broadcast(tensor, src=src, group=group)
        out[key] = tensor.to(torch.bool) if dtype == torch.bool else tensor
    return out


def distribute(batch: Optional[dict], device) -> dict:
    """This rank's share of a micro-batch that the loading rank of its replica holds (else None)."""
    if not dist.is_initialized():
        return {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_src = dist.get_global_rank(tp_group, 0)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        batch = {**_broadcast(batch, PIPELINE_KEYS, dist.get_global_rank(pp_group, 0), pp_group, device),
                 **({k: batch[k] for k in IMAGE_KEYS} if loads_data() else {})}
    keys = PIPELINE_KEYS + (IMAGE_KEYS if parallel_state.is_pipeline_first_stage() else ())
    return _broadcast(batch, keys, tp_src, tp_group, device)


def broadcast_count(value: Optional[int], device) -> int:
    """An integer global rank 0 knows (e.g. validation steps), on every rank."""
    box = torch.tensor([value if dist.get_rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(box, src=0)
    return int(box)
