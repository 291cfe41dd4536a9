"""Training saves: every rank writes its model part into one iteration folder, atomically.

    save_model_weights(model, "ckpts/run1", iteration=2000, hf_config=cfg, opts=opts,
                       config_source=loaded_iteration_dir / "hf_config",
                       before_commit=lambda staging: write_optimizer_state(staging))

All ranks call it together (it synchronises through torch.distributed when initialised). Ranks of
data-parallel rank 0 write `mp_rank_TT_PPP/` into the hidden staging folder; global rank 0 then
writes `checkpoint_info.json` and `hf_config/`, verifies every rank folder against the weight
mapping, renames the staging folder into place (replacing an older save of the same iteration) and
only then points the tracker at it; with `keep_last`, older iteration folders go after that. A
shared filesystem is assumed, as in Megatron-LM.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.checkpoint.config_files import HF_CONFIG_DIR, write_config_dir
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.info import CheckpointInfo
from megatron_patch.checkpoint.layout import (
    Iteration,
    commit,
    fsync_tree,
    iteration_dir_name,
    parse_iteration,
    prune_iterations,
    rank_dir_name,
    staging_path,
    write_tracker,
)
from megatron_patch.checkpoint.model_files import RankReader, write_rank_tensors
from megatron_patch.checkpoint.reshard import unwrap
from megatron_patch.checkpoint.verify import verify_rank_folders
from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.model_loading import local_tensors, pipeline_layout


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(error: Optional[str]) -> None:
    """Rank 0's outcome reaches every rank (a barrier that also carries a failure)."""
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)


def _gather_errors(error: Optional[str]) -> None:
    """Every rank's outcome reaches every rank; the first failure is raised everywhere."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise CheckpointError(failed[0])


def save_model_weights(
    model,
    ckpt_dir,
    iteration: Iteration,
    hf_config,
    opts: ParallelOptions,
    *,
    config_source: Optional[Path] = None,
    before_commit: Optional[Callable[[Path], None]] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Save this rank's model part as part of `ckpt_dir/iter_XXXXXXX`; returns the final folder.

    `config_source`: a folder whose tokenizer/processor files are carried into `hf_config/` (the
    loaded checkpoint's `hf_config/` or the HF folder training started from). `before_commit(staging)`
    runs on every rank after the model files are written and before the folder is published: the
    place to add optimizer/RNG state (`*.pt`, read back with `load_pt`). `keep_last`: once the
    tracker names the new folder, older iteration folders beyond that many are deleted (layout.py).
    """
    iteration = parse_iteration(iteration)
    root = Path(ckpt_dir)
    final = root / iteration_dir_name(iteration)
    staging = staging_path(final)
    error = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)  # left by a crashed save
            staging.mkdir()
        except OSError as err:
            error = f"cannot create {staging}: {err}"
    _agree(error)

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    writes = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    error = None
    try:
        if writes:
            rank_dir = staging / rank_dir_name(tp_rank, stage, opts.pipeline_model_parallel_size)
            write_rank_tensors(rank_dir, local_tensors(unwrap(model), opts))
        if before_commit is not None:
            before_commit(staging)
    except Exception as err:  # reported on every rank so no rank waits forever
        error = f"rank {_rank()} failed to write {staging}: {type(err).__name__}: {err}"
    _gather_errors(error)

    error = None
    if _rank() == 0:
        try:
            layout = pipeline_layout(hf_config, opts)
            tensors = verify_rank_folders(staging, hf_config, layout, opts.tensor_model_parallel_size)
            total = sum(RankReader(d).total_size for d in staging.glob("mp_rank_*"))
            CheckpointInfo(
                iteration=iteration,
                tensor_model_parallel_size=opts.tensor_model_parallel_size,
                pipeline_model_parallel_size=opts.pipeline_model_parallel_size,
                decoder_first_pipeline_num_layers=opts.decoder_first_pipeline_num_layers,
                num_tensors=tensors,
                total_bytes=total,
                created_by="training",
            ).write(staging)
            write_config_dir(staging / HF_CONFIG_DIR, hf_config, config_source)
            fsync_tree(staging)  # everything durable before the rename publishes it
            commit(staging, final, replace=True)
            write_tracker(root, iteration)
        except Exception as err:
            error = f"saving {final} failed: {type(err).__name__}: {err}"
        if error is None and keep_last is not None:
            try:
                prune_iterations(root, keep_last)
            except Exception as err:
                error = f"{final} is saved, but deleting older checkpoints failed: {type(err).__name__}: {err}"
    _agree(error)
    return final
