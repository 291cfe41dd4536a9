"""Low-level safetensors I/O with bounded memory: header layout, writing, reading one tensor.

The file format is safetensors' own (8-byte little-endian header length, JSON header with dtype,
shape and data offsets, then raw little-endian data); files written here are read back with
`safetensors.safe_open` and by `transformers`. Two memory effects are handled on purpose: tensors are
read through short-lived handles (`read_tensor`), and freed heap pages are handed back to the OS
(`release_freed_memory`), so converters' resident size stays at what they actually hold.
"""
from __future__ import annotations

import os

import ctypes
import ctypes.util
import json
import math
import struct
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from megatron_patch.checkpoint.errors import CheckpointError

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def stored_dtype(handle, name: str, where) -> torch.dtype:
    """The torch dtype of tensor `name` in an open safetensors file (header only, no data read)."""
    code = handle.get_slice(name).get_dtype()
    if code not in _CODE_DTYPES:
        raise CheckpointError(f"tensor {name} in {where} has unsupported dtype {code}")
    return _CODE_DTYPES[code]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Tensors of a few MB come from the malloc heap, and once a buffer of them is written and freed
    glibc keeps the pages, so a converter's resident size would ratchet up towards the model size.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def safetensors_header(entries, metadata: Optional[dict] = None) -> tuple[bytes, dict]:
    """(file prefix: 8-byte length + JSON header, {name: (begin, end) data offsets}) for
    `entries` = [(name, dtype, shape)], laid out back to back in that order."""
    header, offsets, offset = {}, {}, 0
    for name, dtype, shape in entries:
        if dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * dtype.itemsize
        offsets[name] = (offset, offset + nbytes)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": list(offsets[name])}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, offsets


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def write_safetensors(path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """Write a safetensors file (the format of `safetensors.torch.save_file`) from the tensors' memory.

    Written here so rank files and the pre-planned HF shards share one header builder, and so views
    (one TP chunk of a bigger tensor) go out without a copy, whatever the safetensors version.
    """
    prefix, _ = safetensors_header([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for tensor in tensors.values():
            f.write(tensor_bytes(tensor))
        f.flush()
        os.fsync(f.fileno())  # durable before the folder holding it is published


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor through its own short-lived `safe_open`.

    safetensors maps the whole file and hands out tensors backed by that mapping; every page read
    through a long-lived handle stays in this process's resident set until the handle closes, so
    reading a model through one handle would show the whole model as resident. A handle per read
    keeps only the pages of tensors still alive.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {name} from {path}: {err}") from None


def open_safetensors(path: Path):
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"corrupt safetensors file {path}: {err}") from None
