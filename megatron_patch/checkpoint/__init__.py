"""Megatron checkpoints of Idefics2: layout, per-rank tensor files, resharding loads, training saves.

Layout (see layout.py and docs/checkpoints.md): MG_DIR/latest_checkpointed_iteration.txt names
`release` or an iteration; each `release/` or `iter_XXXXXXX/` folder holds `checkpoint_info.json`,
`hf_config/` and per-rank `mp_rank_TT[_PPP]/` folders of safetensors under megatron-core names.
A checkpoint saved at one TP/PP layout loads at any other valid one (reshard.py), always through
the model's one weight mapping.

    from megatron_patch.checkpoint import load_model_weights, read_checkpoint_config, save_model_weights
    hf_config = read_checkpoint_config("ckpts/run1")              # build the model from this
    iteration = load_model_weights(model, "ckpts/run1", opts)     # any saved layout -> this rank
    save_model_weights(model, "ckpts/run1", 2000, hf_config, opts)
"""
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.info import CheckpointInfo
from megatron_patch.checkpoint.layout import (
    RELEASE,
    TRACKER_FILE,
    iteration_dir_name,
    list_iterations,
    rank_dir_name,
    read_tracker,
    resolve_iteration,
    write_tracker,
)
from megatron_patch.checkpoint.model_files import load_pt
from megatron_patch.checkpoint.reshard import ShardedCheckpoint, load_model_weights, read_checkpoint_config
from megatron_patch.checkpoint.saving import save_model_weights


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "RELEASE",
    "ShardedCheckpoint",
    "TRACKER_FILE",
    "iteration_dir_name",
    "list_iterations",
    "load_model_weights",
    "load_pt",
    "rank_dir_name",
    "read_checkpoint_config",
    "read_tracker",
    "resolve_iteration",
    "save_model_weights",
    "write_tracker",
]
