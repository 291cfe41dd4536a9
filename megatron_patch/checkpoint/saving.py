"""Model weights as a checkpoint part: each DP-rank-0 rank writes its model part's tensors.

    save_model_weights(model, "ckpts/run1", iteration=2000, hf_config=cfg, opts=opts,
                       config_source=loaded_iteration_dir / "hf_config")

`ModelWeights` writes `mp_rank_TT_PPP/` (model_files.py) from ranks of data-parallel rank 0; on rank
0 its `finish` verifies every rank folder against the weight mapping and writes
`checkpoint_info.json` and `hf_config/`. Training saves it beside its other parts
(`training/checkpointer.py`); `save_model_weights` saves the weights alone, through the same commit
protocol (commit.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megatron.core import parallel_state

from megatron_patch.checkpoint.commit import save_iteration
from megatron_patch.checkpoint.config_files import HF_CONFIG_DIR, write_config_dir
from megatron_patch.checkpoint.info import CheckpointInfo
from megatron_patch.checkpoint.layout import Iteration, parse_iteration, rank_dir_name
from megatron_patch.checkpoint.model_files import RankReader, write_rank_tensors
from megatron_patch.checkpoint.verify import verify_rank_folders
from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.layer_specs import module_to_canonical_name
from megatron_patch.models.idefics2.model_loading import local_tensors, pipeline_layout, unwrap


class ModelWeights:
    """This rank's model part; `config_source`: a folder whose tokenizer/processor files are carried
    into `hf_config/` (the loaded checkpoint's `hf_config/` or the HF folder training started from).
    `lora`: a LoRA run's record (checkpoint/adapters.py): only what trains is saved (the adapters and
    the modules to save)."""

    def __init__(self, model, iteration: Iteration, hf_config, opts: ParallelOptions,
                 config_source: Optional[Path] = None, lora: Optional[dict] = None):
        self.model, self.iteration, self.hf_config, self.opts = model, parse_iteration(iteration), hf_config, opts
        self.config_source, self.lora = config_source, lora

    def snapshot(self, copy: bool) -> Callable[[Path], None]:
        """The writer of this rank's files; with `copy`, of host copies taken now (an asynchronous
        save writes them while training changes the weights)."""
        if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
            return lambda staging: None  # every DP rank holds the same weights
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        name = rank_dir_name(tp_rank, stage, self.opts.pipeline_model_parallel_size)
        model = unwrap(self.model)
        tensors = local_tensors(model, self.opts)  # host copies of GPU parameters; CPU ones as they are
        if self.lora is not None:  # what trains: adapters and modules to save (the frozen base has its checkpoint)
            te = self.opts.uses_transformer_engine()
            trained = {module_to_canonical_name(n, te) for n, p in model.named_parameters() if p.requires_grad}
            tensors = {key: tensor for key, tensor in tensors.items() if key in trained}
        if copy and next(model.parameters()).device.type == "cpu":
            tensors = {key: tensor.clone() for key, tensor in tensors.items()}
        return lambda staging: write_rank_tensors(staging / name, tensors)

    def save(self, staging: Path) -> None:
        self.snapshot(copy=False)(staging)

    def finish(self, staging: Path) -> None:
        opts = self.opts
        layout = pipeline_layout(self.hf_config, opts)
        tensors = verify_rank_folders(staging, self.hf_config, layout, opts.tensor_model_parallel_size, lora=self.lora)
        total = sum(RankReader(d).total_size for d in staging.glob("mp_rank_*"))
        CheckpointInfo(
            iteration=self.iteration,
            tensor_model_parallel_size=opts.tensor_model_parallel_size,
            pipeline_model_parallel_size=opts.pipeline_model_parallel_size,
            decoder_first_pipeline_num_layers=opts.decoder_first_pipeline_num_layers,
            num_tensors=tensors,
            total_bytes=total,
            created_by="training",
            lora=self.lora,
        ).write(staging)
        write_config_dir(staging / HF_CONFIG_DIR, self.hf_config, self.config_source)


def save_model_weights(model, ckpt_dir, iteration: Iteration, hf_config, opts: ParallelOptions, *,
                       config_source: Optional[Path] = None, keep_last: Optional[int] = None) -> Path:
    """Save this rank's model part as part of `ckpt_dir/iter_XXXXXXX` (collective); returns the folder."""
    weights = ModelWeights(model, iteration, hf_config, opts, config_source)
    return save_iteration(ckpt_dir, iteration, [weights], keep_last=keep_last)
