"""Training's optimizer state on disk: one file per data-parallel rank, read back by element range.

    mp_rank_TT_PPP/optimizer-dp000.safetensors, optimizer-dp001.safetensors, ...

Each file holds what one DP rank's optimizer holds for the rank folder's TP x PP shard: for every
trainable tensor, elements [start, end) of its flattened shard, one flat fp32 tensor per state key
(`exp_avg/<canonical local name>`). The header's metadata says which range each tensor covers and the
tensor's full shape (`ranges`), and how many part files the folder has (`parts`). The distributed
optimizer writes one part per DP rank (each its own range, no collective, nothing gathered); any other
optimizer holds the whole shard on every DP rank, so DP rank 0 writes the only part.

Reading asks for a range of a tensor and reads just the pieces of the part files that cover it
(safetensors slices), so a rank resuming at the same layout reads its own range and nothing else.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.safetensors_io import write_safetensors

PART_GLOB = "optimizer-dp*.safetensors"


def part_file_name(dp_rank: int) -> str:
    return f"optimizer-dp{dp_rank:03d}.safetensors"


def write_part(rank_dir, dp_rank: int, parts: int, pieces) -> None:
    """Write one DP rank's part; `pieces` = [(name, start, end, full shape, {key: flat tensor})].
    The tensors are written one at a time from their own memory (a view into the optimizer's state
    is fine; a GPU tensor is copied to the host one tensor at a time)."""
    rank_dir = Path(rank_dir)
    rank_dir.mkdir(parents=True, exist_ok=True)
    tensors, ranges = {}, {}
    for name, start, end, shape, states in pieces:
        ranges[name] = [start, end, list(shape)]
        for key, flat in states.items():
            if flat.dtype != torch.float32 or flat.numel() != end - start:
                raise CheckpointError(f"optimizer state {key}/{name} must be {end - start} fp32 elements, "
                                      f"got {flat.numel()} {flat.dtype}")
            tensors[f"{key}/{name}"] = flat
    metadata = {"format": "pt", "parts": str(parts), "ranges": json.dumps(ranges, separators=(",", ":"))}
    write_safetensors(rank_dir / part_file_name(dp_rank), tensors, metadata=metadata)


class OptimizerPartsReader:
    """One rank folder's optimizer parts; `get_range(name, start, end)` reads only what covers it.

    Has the interface of `RankReader` (`name in reader`, `get(name)`), so `ShardedCheckpoint` can
    merge TP shards from it when the saved and the resumed layouts split a tensor differently."""

    def __init__(self, rank_dir, index_file=None):
        self.rank_dir = Path(rank_dir)
        files = sorted(self.rank_dir.glob(PART_GLOB))
        if not files:
            raise CheckpointError(f"{self.rank_dir} holds no optimizer state ({PART_GLOB}); resume with "
                                  f"--no-load-optim to start the optimizer afresh")
        self.pieces: dict[str, list[tuple[Path, int, int]]] = {}
        self.shapes: dict[str, tuple] = {}
        self.tensor_names: set[str] = set()
        counts = set()
        for path in files:
            metadata, names = self._header(path)
            counts.add(metadata["parts"])
            for name, (start, end, shape) in json.loads(metadata["ranges"]).items():
                self.pieces.setdefault(name, []).append((path, start, end))
                self.shapes[name] = tuple(shape)
            self.tensor_names.update(names)
        parts = int(counts.pop()) if len(counts) == 1 else None
        expected = {part_file_name(d) for d in range(parts or 0)}
        if parts is None or {p.name for p in files} != expected:
            raise CheckpointError(f"{self.rank_dir}: optimizer part files {[p.name for p in files]} do not "
                                  f"form one complete save (each names {sorted(counts) or parts} parts)")

    @staticmethod
    def _header(path: Path) -> tuple[dict, list[str]]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata, names = handle.metadata() or {}, list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"corrupt optimizer state file {path}: {err}") from None
        if "parts" not in metadata or "ranges" not in metadata:
            raise CheckpointError(f"{path} lacks the optimizer parts metadata (parts, ranges)")
        return metadata, names

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_names

    def _tensor(self, name: str) -> str:
        """The canonical tensor name behind `key/name`, checked to be present."""
        if name not in self.tensor_names:
            raise CheckpointError(f"optimizer state {name} is missing from {self.rank_dir}")
        return name.split("/", 1)[1]

    def shape(self, name: str) -> tuple:
        return self.shapes[self._tensor(name)]

    def get(self, name: str) -> torch.Tensor:
        """The whole state tensor of the rank folder's shard, in its shape."""
        shape = self.shape(name)
        return self.get_range(name, 0, math.prod(shape)).view(shape)

    def get_range(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, from the part files that hold them."""
        out = torch.empty(end - start, dtype=torch.float32)
        covered = 0
        for path, piece_start, piece_end in self.pieces[self._tensor(name)]:
            lo, hi = max(start, piece_start), min(end, piece_end)
            if lo >= hi:
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    out[lo - start:hi - start] = handle.get_slice(name)[lo - piece_start:hi - piece_start]
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"cannot read {name} from {path}: {err}") from None
            covered += hi - lo
        if covered != end - start:
            raise CheckpointError(f"{self.rank_dir}: the optimizer parts hold {covered} of the {end - start} "
                                  f"elements [{start}, {end}) of {name}")
        return out
