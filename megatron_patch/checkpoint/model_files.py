"""One rank's model tensors on disk: tensor-only safetensors files plus a JSON index.

    mp_rank_TT_PPP/model-00001.safetensors, model-00002.safetensors, ...
    mp_rank_TT_PPP/model.safetensors.index.json
        {"metadata": {"total_size": BYTES, "num_tensors": N},
         "weight_map": {"language_model.decoder.layers.0.mlp.linear_fc1.weight": "model-00001.safetensors", ...}}

Names are megatron-core canonical names with stage-local layer numbers (weight_mapping.py). A rank is
split into several files so a converter can write tensors a few at a time: `WriterPool` buffers
tensors for many ranks and writes the largest buffer out whenever the total passes a byte budget;
a tensor of a quarter of the budget or more is written at once into a file of its own.
Nothing here unpickles: safetensors and JSON only; `load_pt` (for training's optimizer/RNG state)
always loads with `weights_only=True`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import write_durable
from megatron_patch.checkpoint.safetensors_io import (
    open_safetensors,
    read_tensor,
    release_freed_memory,
    stored_dtype,
    write_safetensors,
)

INDEX_FILE = "model.safetensors.index.json"
def own_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its storage: a view (e.g. one TP chunk) would keep the
    whole source tensor alive while buffered."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes or tensor.storage_offset():
        tensor = tensor.contiguous().clone()
    return tensor


class RankWriter:
    """Writes one rank folder: `add` tensors, `flush` them into the next file, `close` writes the index."""

    def __init__(self, rank_dir, stem: str = "model", index_file: str = INDEX_FILE):
        """`stem` / `index_file`: model tensors by default; training's optimizer state uses its own."""
        self.rank_dir = Path(rank_dir)
        self.stem, self.index_file = stem, index_file
        self.rank_dir.mkdir(parents=True, exist_ok=True)
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.files = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or name in self.weight_map:
            raise CheckpointError(f"tensor {name} written twice to {self.rank_dir}")
        tensor = own_tensor(tensor)
        self.buffer[name] = tensor
        self.buffered_bytes += tensor.nbytes

    def write_alone(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (a view is fine) into a file of its own, bypassing the buffer."""
        if name in self.buffer or name in self.weight_map:
            raise CheckpointError(f"tensor {name} written twice to {self.rank_dir}")
        self.files += 1
        file_name = f"{self.stem}-{self.files:05d}.safetensors"
        write_safetensors(self.rank_dir / file_name, {name: tensor.detach().cpu()}, metadata={"format": "pt"})
        self.weight_map[name] = file_name
        self.total_bytes += tensor.nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        self.files += 1
        file_name = f"{self.stem}-{self.files:05d}.safetensors"
        write_safetensors(self.rank_dir / file_name, self.buffer, metadata={"format": "pt"})
        for name in self.buffer:
            self.weight_map[name] = file_name
        self.total_bytes += self.buffered_bytes
        self.buffer, self.buffered_bytes = {}, 0
        release_freed_memory()

    def close(self) -> None:
        self.flush()
        index = {
            "metadata": {"total_size": self.total_bytes, "num_tensors": len(self.weight_map)},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        write_durable(self.rank_dir / self.index_file, json.dumps(index, indent=2) + "\n")


class WriterPool:
    """Rank writers sharing one memory budget: past it, the largest buffer is written out."""

    def __init__(self, root, budget_bytes: int):
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.writers: dict[str, RankWriter] = {}

    def add(self, rank_dir_name: str, name: str, tensor: torch.Tensor) -> None:
        writer = self.writers.get(rank_dir_name)
        if writer is None:
            writer = self.writers[rank_dir_name] = RankWriter(self.root / rank_dir_name)
        if tensor.nbytes * 4 >= self.budget_bytes:
            writer.write_alone(name, tensor)  # a big TP chunk goes out at once, never copied into the buffer
            return
        writer.add(name, tensor)
        while sum(w.buffered_bytes for w in self.writers.values()) > self.budget_bytes:
            max(self.writers.values(), key=lambda w: w.buffered_bytes).flush()

    def close(self) -> tuple[int, int]:
        """Flush everything and write the indexes; returns (tensors, bytes) written."""
        for writer in self.writers.values():
            writer.close()
        return (
            sum(len(w.weight_map) for w in self.writers.values()),
            sum(w.total_bytes for w in self.writers.values()),
        )


def write_rank_tensors(rank_dir, tensors, max_file_bytes: int = 2 << 30, stem: str = "model",
                       index_file: str = INDEX_FILE) -> int:
    """Write a whole rank's tensors (a training save; a dict or (name, tensor) pairs, consumed one at
    a time), in files of at most ~max_file_bytes; returns bytes."""
    writer = RankWriter(rank_dir, stem, index_file)
    tensors = tensors.items() if isinstance(tensors, dict) else tensors
    for name, tensor in tensors:
        writer.add(name, tensor)
        if writer.buffered_bytes >= max_file_bytes:
            writer.flush()
    writer.close()
    return writer.total_bytes


class RankReader:
    """Reads one rank folder lazily: tensors are loaded one at a time, on request."""

    def __init__(self, rank_dir, index_file: str = INDEX_FILE):
        self.rank_dir = Path(rank_dir)
        self.index_file = index_file
        index_path = self.rank_dir / index_file
        if not self.rank_dir.is_dir():
            raise CheckpointError(f"rank folder {self.rank_dir} is missing")
        if not index_path.is_file():
            raise CheckpointError(f"{index_path} is missing")
        try:
            index = json.loads(index_path.read_text())
            self.weight_map: dict[str, str] = index["weight_map"]
            self.total_size = int(index.get("metadata", {}).get("total_size", 0))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{index_path} is not a valid index ({type(err).__name__}: {err})") from None
        self._handles = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is not in {self.rank_dir / self.index_file}")
        file_name = self.weight_map[name]
        handle = self._handles.get(file_name)
        if handle is None:
            handle = self._handles[file_name] = open_safetensors(self.rank_dir / file_name)
        if name not in handle.keys():
            raise CheckpointError(f"{self.rank_dir / self.index_file} places {name} in {file_name}, which lacks it")
        return handle

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return stored_dtype(self._handle(name), name, self.rank_dir)

    def get(self, name: str) -> torch.Tensor:
        self._handle(name)  # validates the index entry
        return read_tensor(self.rank_dir / self.weight_map[name], name)


def load_pt(path, map_location: Optional[str] = "cpu"):
    """Load a `*.pt` (optimizer/RNG state) with weights_only=True: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"cannot load {path} with weights_only=True: {type(err).__name__}: {err}") from None
