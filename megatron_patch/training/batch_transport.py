"""Load each micro-batch once per model replica and send every rank only what it needs.

Only TP rank 0 of the first pipeline stage reads, decodes and encodes (`loads_data`). Each
micro-batch then travels in two broadcasts:
1. over the pipeline group of TP rank 0, the text part every stage needs (`PIPELINE_KEYS`: token
   ids and positions for the shapes, the packed-row boundaries for attention, the labels and loss
   mask for the last stage's loss);
2. over each stage's TP group, that stage's part (the first stage also gets the images).
Shapes vary between micro-batches (images, packed-row boundaries), so each hop is two collectives:
a fixed-size int64 header describing the tensors, then all their bytes in one uint8 buffer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

PIPELINE_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "cu_seqlens", "max_seqlen")
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_mask", "pixel_norm")


def loads_data() -> bool:
    """Whether this rank runs a data loader: TP rank 0 of the first pipeline stage."""
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage()


_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS, _FIELDS = 5, 8  # per tensor in the header: key, dtype, ndim, then up to 5 sizes
_HEADER = 1 + len(PIPELINE_KEYS + IMAGE_KEYS) * _FIELDS


def _header(batch: dict, keys) -> torch.Tensor:
    rows = []
    for i, key in enumerate(keys):
        if key in batch:
            shape = list(batch[key].shape)
            rows += [i, _DTYPES.index(batch[key].dtype), len(shape)] + shape + [0] * (_MAX_DIMS - len(shape))
    return torch.tensor([len(rows) // _FIELDS] + rows + [0] * (_HEADER - 1 - len(rows)), dtype=torch.int64)


def _broadcast(batch: Optional[dict], keys, src: int, group, device) -> dict:
    """Broadcast `keys` of `batch` (held by global rank `src`) to every rank of `group`: one small
    header (which tensors, their dtypes and shapes), then all their bytes in one buffer."""
    if dist.get_world_size(group) == 1:
        return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    is_src = dist.get_rank() == src
    header = (_header(batch, keys) if is_src else torch.zeros(_HEADER, dtype=torch.int64)).to(device)
    dist.broadcast(header, src=src, group=group)
    specs = header[1:].view(-1, _FIELDS)[: int(header[0])].tolist()
    shapes = [(keys[k], _DTYPES[d], tuple(dims[:n])) for k, d, n, *dims in specs]
    sizes = [math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for _, dtype, shape in shapes]
    slots = [-(-size // 8) * 8 for size in sizes]  # 8-byte aligned, so every part views as its dtype
    if is_src:
        payload = torch.zeros(sum(slots), dtype=torch.uint8, device=device)
        for (key, _, _), start, size in zip(shapes, _offsets(slots), sizes):
            payload[start:start + size] = batch[key].detach().to(device).contiguous().reshape(-1).view(torch.uint8)
    else:
        payload = torch.empty(sum(slots), dtype=torch.uint8, device=device)
    if payload.numel():
        dist.broadcast(payload, src=src, group=group)
    return {key: payload[start:start + size].view(dtype).reshape(shape)
            for (key, dtype, shape), start, size in zip(shapes, _offsets(slots), sizes)}


def _offsets(slots) -> list:
    return [sum(slots[:i]) for i in range(len(slots))]


def distribute(batch: Optional[dict], device) -> dict:
    """This rank's share of a micro-batch that the loading rank of its replica holds (else None)."""
    if not dist.is_initialized():
        return {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_src = dist.get_global_rank(tp_group, 0)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        batch = {**_broadcast(batch, PIPELINE_KEYS, dist.get_global_rank(pp_group, 0), pp_group, device),
                 **({k: batch[k] for k in IMAGE_KEYS if k in batch} if loads_data() else {})}
    keys = PIPELINE_KEYS + (IMAGE_KEYS if parallel_state.is_pipeline_first_stage() else ())
    return _broadcast(batch, keys, tp_src, tp_group, device)


def broadcast_count(value: Optional[int], device) -> int:
    """An integer global rank 0 knows (e.g. validation steps), on every rank."""
    box = torch.tensor([value if dist.get_rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(box, src=0)
    return int(box)
