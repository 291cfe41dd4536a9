"""Load each micro-batch once per model replica and send every rank only what its stage needs.

Only TP rank 0 of the first pipeline stage reads, decodes and encodes (`loads_data`). A micro-batch
then travels in up to two hops:
1. `pipeline_hop`, over the pipeline group of TP rank 0 (PP > 1 only), before the schedule: what the
   later stages need, the labels and loss mask for the last stage's loss and the packed-row
   boundaries for attention. It cannot run inside the schedule: there the stages work on different
   micro-batches at any one time, and a collective over the pipeline group would wait for a stage
   that is itself waiting for a pipeline send.
2. `tensor_hop`, over each stage's TP group, in the forward step of that micro-batch (`micro_batches.py`):
   the stage's part (`stage_keys`: the first stage gets tokens, positions and images, the last the
   labels and loss mask). The TP ranks of a stage run the schedule in step, as they do for the
   layers' own TP collectives.
Device tensors travel as bytes on the device; host values (`HOST_KEYS`: the packed-row boundaries,
the pixel normalisation, the collator's image counts, `data/collate.py`) travel inside the header
and arrive on the host, so nobody downstream reads a device tensor back to learn a size. Shapes vary
between micro-batches, so a hop is two collectives: a fixed-size int64 header (which tensors, their
dtypes and shapes, then the host values), then all the tensors' bytes in one uint8 buffer. A
receiver reads the header on the host: one host sync per hop, which it cannot avoid (it must know
the sizes before it can receive); the sender builds it on the host and reads nothing back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

TEXT_KEYS = ("tokens", "position_ids")
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_mask")
LOSS_KEYS = ("labels", "loss_mask")
PIPELINE_HOST_KEYS = ("cu_seqlens",)
FIRST_STAGE_HOST_KEYS = ("pixel_norm", "num_images", "image_tokens", "image_sizes")
HOST_KEYS = PIPELINE_HOST_KEYS + FIRST_STAGE_HOST_KEYS
_LISTS = {"image_tokens": 1, "image_sizes": 2}  # Python lists in the batch (ints, (h, w) pairs): their ndim
_OVERFLOW = "_host_words"  # host values too long for the header travel as a tensor (and cost a second sync)
_DEVICE_SLOTS = TEXT_KEYS + IMAGE_KEYS + LOSS_KEYS + (_OVERFLOW,)


def loads_data() -> bool:
    """Whether this rank runs a data loader: TP rank 0 of the first pipeline stage."""
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_first_stage()


def stage_keys(first: bool, last: bool) -> tuple[tuple, tuple]:
    """(device keys, host keys) of a micro-batch that a stage's ranks need."""
    device = (TEXT_KEYS + IMAGE_KEYS if first else ()) + (LOSS_KEYS if last else ())
    return device, PIPELINE_HOST_KEYS + (FIRST_STAGE_HOST_KEYS if first else ())


_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS, _FIELDS = 5, 8  # per tensor: key, dtype, ndim, then up to 5 sizes
_HOST_WORDS = 2048  # int64 words of host values the header holds (16 KiB)
_SPECS = 1 + len(_DEVICE_SLOTS) * _FIELDS
_HEADER = _SPECS + 1 + _HOST_WORDS


def _spec(key_index: int, tensor: torch.Tensor) -> list:
    shape = list(tensor.shape)
    return [key_index, _DTYPES.index(tensor.dtype), len(shape)] + shape + [0] * (_MAX_DIMS - len(shape))


def _host_words(batch: dict, keys) -> list:
    """The host values of `keys` in `batch` as int64 words: per value a spec, then its bytes."""
    words = []
    for i, key in enumerate(HOST_KEYS):
        if key in keys and key in batch:
            value = batch[key]
            if key in _LISTS:
                value = torch.tensor(value, dtype=torch.int64).reshape(-1, *((2,) if _LISTS[key] == 2 else ()))
            raw = value.detach().contiguous().reshape(-1).view(torch.uint8)
            raw = torch.cat([raw, raw.new_zeros(-raw.numel() % 8)])
            words += _spec(i, value) + raw.view(torch.int64).tolist()
    return words


def _host_values(words: list) -> dict:
    """The inverse of `_host_words`: CPU tensors, and Python lists for `_LISTS`."""
    out, i = {}, 0
    while i < len(words):
        key, dtype, ndim = HOST_KEYS[words[i]], _DTYPES[words[i + 1]], words[i + 2]
        shape = tuple(words[i + 3:i + 3 + ndim])
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        count = -(-size // 8)
        value = torch.tensor(words[i + _FIELDS:i + _FIELDS + count], dtype=torch.int64).view(torch.uint8)
        value = value[:size].view(dtype).reshape(shape)
        if key in _LISTS:
            value = [tuple(v) for v in value.tolist()] if _LISTS[key] == 2 else value.tolist()
        out[key] = value
        i += _FIELDS + count
    return out


def _local(batch: dict, device_keys, host_keys, device) -> dict:
    """No peer to send to: the device keys moved to the device, host values as they are."""
    return {**{k: batch[k].to(device, non_blocking=True) for k in device_keys if k in batch},
            **{k: batch[k] for k in host_keys if k in batch}}


def _broadcast(batch: Optional[dict], device_keys, host_keys, src: int, group, device) -> dict:
    """`device_keys` and `host_keys` of `batch` (held by global rank `src`) on every rank of `group`:
    one header (which tensors, their dtypes and shapes; the host values), then all tensor bytes."""
    if dist.get_world_size(group) == 1:
        return _local(batch, device_keys, host_keys, device)
    is_src = dist.get_rank() == src
    if is_src:
        host = _host_words(batch, host_keys)
        tensors = {k: batch[k] for k in device_keys if k in batch}
        if len(host) > _HOST_WORDS:
            tensors[_OVERFLOW] = torch.tensor(host, dtype=torch.int64)
        specs = [w for key, t in tensors.items() for w in _spec(_DEVICE_SLOTS.index(key), t)]
        fields = [len(tensors)] + specs + [0] * (_SPECS - 1 - len(specs))
        fields += [len(host) if len(host) <= _HOST_WORDS else -1] + (host if len(host) <= _HOST_WORDS else [])
        fields += [0] * (_HEADER - len(fields))
        header = torch.tensor(fields, dtype=torch.int64).to(device, non_blocking=True)
    else:
        header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, src=src, group=group)
    if not is_src:
        fields = header.tolist()  # the hop's one host sync: the sizes of what comes next
    specs = [fields[1 + i * _FIELDS:1 + (i + 1) * _FIELDS] for i in range(fields[0])]
    shapes = [(_DEVICE_SLOTS[k], _DTYPES[d], tuple(dims[:n])) for k, d, n, *dims in specs]
    sizes = [math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for _, dtype, shape in shapes]
    slots = [-(-size // 8) * 8 for size in sizes]  # 8-byte aligned, so every part views as its dtype
    payload = torch.empty(sum(slots), dtype=torch.uint8, device=device)
    if is_src:
        for (key, _, _), start, size in zip(shapes, _offsets(slots), sizes):
            part = tensors[key].detach().contiguous().reshape(-1).view(torch.uint8)
            payload[start:start + size].copy_(part, non_blocking=True)
    if payload.numel():
        dist.broadcast(payload, src=src, group=group)
    out = {key: payload[start:start + size].view(dtype).reshape(shape)
           for (key, dtype, shape), start, size in zip(shapes, _offsets(slots), sizes)}
    if is_src:
        return {**{k: v for k, v in out.items() if k != _OVERFLOW}, **{k: batch[k] for k in host_keys if k in batch}}
    host_length = fields[_SPECS]
    host = fields[_SPECS + 1:_SPECS + 1 + host_length] if host_length >= 0 else out.pop(_OVERFLOW).tolist()
    return {**out, **_host_values(host)}


def _offsets(slots) -> list:
    return [sum(slots[:i]) for i in range(len(slots))]


def pipeline_hop(batch: Optional[dict], device) -> Optional[dict]:
    """Before the schedule, on TP rank 0 of every stage (PP > 1): the loading rank keeps `batch` (its
    collated micro-batch, returned as it is); the later stages get the labels, the loss mask and the
    packed-row boundaries (stages between the first and the last receive the labels and loss mask too:
    it is one broadcast over the pipeline group; they read nothing of them)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, 0)
    received = _broadcast(batch, LOSS_KEYS, PIPELINE_HOST_KEYS, src, group, device)
    return batch if dist.get_rank() == src else received


def tensor_hop(batch: Optional[dict], device) -> dict:
    """In the forward step: this rank's part (`stage_keys`) of the micro-batch its stage's TP rank 0
    holds (`batch`: the loader's on the loading rank, `pipeline_hop`'s on the other stages, None on
    TP ranks > 0). Device keys on `device`, host values on the host."""
    device_keys, host_keys = stage_keys(parallel_state.is_pipeline_first_stage(),
                                        parallel_state.is_pipeline_last_stage())
    if not dist.is_initialized():
        return _local(batch, device_keys, host_keys, device)
    group = parallel_state.get_tensor_model_parallel_group()
    return _broadcast(batch, device_keys, host_keys, dist.get_global_rank(group, 0), group, device)


def broadcast_count(value: Optional[int], device) -> int:
    """An integer global rank 0 knows (e.g. validation steps), on every rank."""
    box = torch.tensor([value if dist.get_rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(box, src=0)
    return int(box)
