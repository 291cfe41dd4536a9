"""Load a checkpoint saved at one TP/PP layout into a model part laid out at any other.

The source ranks' shards of a tensor are merged back into the HF tensors with `mcore_to_hf` and the
target rank's shard is cut from them with `hf_to_mcore` (inside `load_hf_weights`): the one weight
mapping, no second name table. Each target rank reads only the tensors of its own pipeline stage,
one mapping at a time, so memory stays at about one full tensor beyond the model part.

    iteration = load_model_weights(model, "ckpts/run1", opts)        # the tracker's iteration
    iteration = load_model_weights(model, "ckpts/run1", opts, iteration=2000)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_patch.checkpoint.config_files import HF_CONFIG_DIR, read_idefics2_config
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.info import CheckpointInfo
from megatron_patch.checkpoint.layout import Iteration, rank_dir_name, resolve_iteration
from megatron_patch.checkpoint.model_files import INDEX_FILE, RankReader
from megatron_patch.models.idefics2.config import ParallelOptions, tied_word_embeddings, validate_layout
from megatron_patch.models.idefics2.weight_mapping import (
    KVCopyMismatch,
    TensorMapping,
    checkpoint_mappings,
    hf_to_mcore,
    mcore_to_hf,
)


class ShardedCheckpoint:
    """One iteration folder opened for reading: its info, its HF config, its ranks' tensors (lazy)."""

    def __init__(self, iteration_dir, hf_config=None, index_file: str = INDEX_FILE, prefix: str = "",
                 reader_class=RankReader):
        """`index_file` / `prefix` / `reader_class`: which tensors of the rank folders to read and how
        (the model's by default; training's optimizer state keeps e.g. `exp_avg/<name>` in its parts)."""
        self.dir = Path(iteration_dir)
        self.index_file, self.prefix, self.reader_class = index_file, prefix, reader_class
        self.info = CheckpointInfo.read(self.dir)
        self.hf_config = hf_config if hf_config is not None else read_idefics2_config(self.dir / HF_CONFIG_DIR)
        self.layout = self.info.pipeline_layout(self.hf_config)
        self.tp_size = self.info.tensor_model_parallel_size
        try:
            validate_layout(self.hf_config, self.info.parallel_options())
        except ValueError as err:
            raise CheckpointError(f"{self.dir}: saved layout does not fit its config: {err}") from None
        self.tied = tied_word_embeddings(self.hf_config)
        # A LoRA checkpoint: its adapters and the modules it trained fully.
        self.mappings = checkpoint_mappings(self.hf_config, self.info.adapter_targets, self.info.modules_to_save)
        self._readers: dict[tuple, RankReader] = {}
        self._source: dict[str, tuple] = {}  # HF name -> (mapping, stage, local) it is merged from
        for m in self.mappings:
            placements = self.layout.placements(m, self.tied)
            for name in m.hf:
                if placements and name not in self._source:
                    self._source[name] = (m, *placements[0])
        self._cached: tuple = (None, None)  # (mapping, its HF tensors): qkv/gated parts are asked for one by one

    def ranks(self) -> list[tuple[int, int]]:
        """(pipeline stage, TP rank) of every rank folder of the saved layout."""
        return [(s, r) for s in range(self.layout.pipeline_size) for r in range(self.tp_size)]

    def rank_dir(self, stage: int, tp_rank: int) -> Path:
        return self.dir / rank_dir_name(tp_rank, stage, self.layout.pipeline_size)

    def reader(self, stage: int, tp_rank: int) -> RankReader:
        key = (stage, tp_rank)
        if key not in self._readers:
            self._readers[key] = self.reader_class(self.rank_dir(stage, tp_rank), self.index_file)
        return self._readers[key]

    def mcore_shards(self, stage: int, local: str) -> list[torch.Tensor]:
        """The TP shards (rank order) of one megatron tensor of pipeline stage `stage`."""
        shards = []
        for r in range(self.tp_size):
            reader = self.reader(stage, r)
            name = self.prefix + local
            if name not in reader:
                raise CheckpointError(f"tensor {name} is missing from {reader.rank_dir / self.index_file}")
            shards.append(reader.get(name))
        return shards

    def hf_tensors(self, m: TensorMapping, stage: int, local: str, shards=None) -> list[torch.Tensor]:
        """The HF tensors of mapping `m`, merged from its shards at (stage, local) (read unless given)."""
        try:
            return mcore_to_hf(m, self.mcore_shards(stage, local) if shards is None else shards)
        except KVCopyMismatch as err:  # replicated KV copies out of sync: no copy is "the" weight
            raise CheckpointError(f"checkpoint {self.dir} ({self.index_file}): {self.prefix}{err}") from None

    def shard_range(self, m: TensorMapping, tp_rank: int, tp_size: int, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened TP shard `tp_rank` of `tp_size` of tensor `m`. Where
        the saved layout splits it the same way, only that range of the saved shard is read (readers
        with `get_range`); otherwise the HF tensors are merged from the saved shards and cut."""
        source, stage, local = self._source[m.hf[0]]
        reader = self.reader(stage, tp_rank) if tp_rank < self.tp_size else None
        if (tp_size == self.tp_size and (source.split, source.hf) == (m.split, m.hf)
                and hasattr(reader, "get_range")):
            return reader.get_range(self.prefix + local, start, end)
        return hf_to_mcore(m, [self.hf_tensor(h) for h in m.hf], tp_rank, tp_size).reshape(-1)[start:end]

    def hf_tensor(self, name: str) -> torch.Tensor:
        """One full HF tensor by name (what `load_hf_weights` asks for)."""
        if name not in self._source:
            raise CheckpointError(f"HF tensor {name} is not part of the Idefics2 mapping for {self.dir}")
        m, stage, local = self._source[name]
        if self._cached[0] is not m:
            self._cached = (m, self.hf_tensors(m, stage, local))
        return self._cached[1][m.hf.index(name)]



def read_checkpoint_config(ckpt_dir, iteration: Optional[Iteration] = None):
    """The HF Idefics2 config a checkpoint was built from (build the model from it: no architecture flags)."""
    _, folder = resolve_iteration(ckpt_dir, iteration)
    return read_idefics2_config(folder / HF_CONFIG_DIR)


def load_model_weights(model, ckpt_dir, opts: ParallelOptions, iteration: Optional[Iteration] = None, hf_config=None) -> Iteration:
    """Fill this rank's model part (built at `opts`; DDP / Float16Module wrappers are looked through)
    from a checkpoint saved at any layout.

    Needs megatron-core's parallel state (the target TP/PP ranks). Returns the iteration loaded.
    Every parameter of the part must be filled, each with the shape the model expects; from a LoRA
    checkpoint, every adapter (the base comes from its own checkpoint).
    """
    from megatron_patch.models.idefics2.model_loading import load_hf_weights, unwrap

    iteration, folder = resolve_iteration(ckpt_dir, iteration)
    source = ShardedCheckpoint(folder, hf_config)
    validate_layout(source.hf_config, opts)
    load_hf_weights(unwrap(model), source.hf_tensor, source.hf_config, opts, source.mappings)
    return iteration
