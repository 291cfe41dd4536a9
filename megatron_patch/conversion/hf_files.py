"""Hugging Face checkpoint weights: read `model.safetensors` or a sharded index lazily, write sharded.

Reading opens each file with `safetensors.safe_open` (headers: names, shapes, dtypes) and loads one
tensor at a time through a short-lived handle (`read_tensor`), so converters never hold a whole model.
Writing lays out `model-0000K-of-0000N.safetensors` shards from a plan of names, dtypes and shapes,
writes each tensor into place as it comes, and writes `model.safetensors.index.json` (always, even for
one shard): the layout `from_pretrained` reads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.safetensors_io import (
    open_safetensors,
    read_tensor,
    safetensors_header,
    stored_dtype,
    tensor_bytes,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFWeightsReader:
    """The tensors of an HF checkpoint folder, by name, loaded on request."""

    def __init__(self, hf_dir):
        self.hf_dir = Path(hf_dir)
        index_path, single = self.hf_dir / INDEX_FILE, self.hf_dir / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path} is not a valid safetensors index ({type(err).__name__}: {err})") from None
        elif single.is_file():
            weight_map = None
        else:
            hint = "; pytorch_model.bin is not read (loading it would unpickle): save it as safetensors first" if any(
                self.hf_dir.glob("pytorch_model*.bin")) else ""
            raise CheckpointError(f"{self.hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self._handles = {f: open_safetensors(self.hf_dir / f) for f in files}  # opening validates headers
        self.weight_map = {}
        for file_name, handle in self._handles.items():
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != file_name:
                    continue  # a stray copy the index does not point at
                self.weight_map[name] = file_name
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self.weight_map]
            if missing:
                raise CheckpointError(f"{index_path} places {missing[0]} in {weight_map[missing[0]]}, which lacks it")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return stored_dtype(self._handles[self.weight_map[name]], name, self.hf_dir / self.weight_map[name])

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"HF checkpoint {self.hf_dir} lacks tensor {name}")
        return read_tensor(self.hf_dir / self.weight_map[name], name)  # not via the long-lived handle: see read_tensor


class HFShardWriter:
    """Writes HF safetensors shards and the index for a planned set of tensors, in any order.

    The plan ({name: (dtype, shape)}, in shard order) fixes every shard's header up front, so each
    tensor is written straight to its place in its file as soon as it exists: memory stays at the
    tensor being written, whatever `max_shard_bytes` is.
    """

    def __init__(self, out_dir, plan: dict, max_shard_bytes: int = 2 * 10**9):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        shards: list[list[str]] = [[]]
        size = 0
        for name, (dtype, shape) in plan.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        count = len(shards)
        self.total_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.place: dict[str, tuple] = {}  # name -> (file, absolute offset, nbytes)
        for k, names in enumerate(shards, start=1):
            file_name = f"model-{k:05d}-of-{count:05d}.safetensors"
            prefix, offsets = safetensors_header([(n, *plan[n]) for n in names], {"format": "pt"})
            path = self.out_dir / file_name
            with open(path, "wb") as f:
                f.write(prefix)
                f.truncate(len(prefix) + (max(e for _, e in offsets.values()) if offsets else 0))
            for name in names:
                begin, end = offsets[name]
                self.place[name] = (path, len(prefix) + begin, end - begin)
                self.weight_map[name] = file_name
                self.total_bytes += end - begin
        self.written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan:
            raise CheckpointError(f"HF tensor {name} is not in the output plan")
        if name in self.written:
            raise CheckpointError(f"HF tensor {name} written twice")
        dtype, shape = self.plan[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"HF tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, the output plan says {dtype} {tuple(shape)}"
            )
        path, offset, _ = self.place[name]
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(tensor_bytes(tensor))
        self.written.add(name)

    def close(self) -> dict[str, str]:
        """Check every planned tensor was written, write the index; returns the weight map."""
        missing = [n for n in self.plan if n not in self.written]
        if missing:
            raise CheckpointError(f"HF tensor {missing[0]} was never written ({len(missing)} missing)")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.weight_map
