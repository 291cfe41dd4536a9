"""Per-rank bodies of the resharding tests (run on gloo ranks by tests/distributed_harness.py)."""
from __future__ import annotations

import torch.distributed as dist

from megatron_patch.checkpoint import load_model_weights, read_checkpoint_config, resolve_iteration, save_model_weights
from megatron_patch.checkpoint.config_files import HF_CONFIG_DIR
from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.model import build_model
from megatron_patch.platform import init_distributed
from megatron_patch.testing.parity import hf_outputs, max_abs_diffs, megatron_outputs, random_inputs


def _load(mg_dir: str, tp: int, pp: int, iteration=None):
    """Build the model at tp x pp from the checkpoint's own config and load it (any saved layout)."""
    init_distributed(tp, pp, seed=1234)
    config = read_checkpoint_config(mg_dir, iteration)
    opts = ParallelOptions(tp, pp)
    model = build_model(config, opts, init_weights=False)
    loaded = load_model_weights(model, mg_dir, opts, iteration=iteration)
    return config, opts, model.eval(), loaded


def load_and_compare(mg_dir: str, hf_dir: str, tp: int, pp: int, iteration=None):
    """Max abs diffs (vision, connector, logits) vs transformers on `hf_dir`, on rank 0; None elsewhere."""
    from transformers import Idefics2ForConditionalGeneration

    config, _, model, loaded = _load(mg_dir, tp, pp, iteration)
    inputs = random_inputs(config, batch_size=2, num_images=2, seed=5)
    ours = megatron_outputs([model], inputs, config.text_config.vocab_size)
    if dist.get_rank() != 0:
        return None
    reference = hf_outputs(Idefics2ForConditionalGeneration.from_pretrained(hf_dir).eval(), inputs)
    return {"iteration": loaded, **max_abs_diffs(ours, reference)}


def load_then_save(mg_dir: str, out_dir: str, tp: int, pp: int, iteration: int):
    """Load at tp x pp, save as a training checkpoint at `iteration` in `out_dir`; returns the folder."""
    config, opts, model, _ = _load(mg_dir, tp, pp)
    _, source = resolve_iteration(mg_dir)
    final = save_model_weights(model, out_dir, iteration, config, opts, config_source=source / HF_CONFIG_DIR)
    return str(final)


def load_into_a_model_with_an_unmapped_weight(mg_dir: str):
    """Load a full checkpoint into a model holding one weight no mapping names: the error, one line."""
    import torch

    init_distributed(1, 1, seed=1234)
    config = read_checkpoint_config(mg_dir)
    opts = ParallelOptions(1, 1)
    model = build_model(config, opts, init_weights=False)
    model.connector.register_parameter("stray", torch.nn.Parameter(torch.zeros(2)))
    try:
        load_model_weights(model, mg_dir, opts)
    except KeyError as err:
        return str(err)
    return None
