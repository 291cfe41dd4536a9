"""What each (TP rank, pipeline stage) holds, counted from the real model part built on the meta device.

Two counts per component (vision tower, connector = modality projection + perceiver, language model):
- `held`: elements the rank stores (what its memory pays for): TP-replicated tensors, replicated
  perceiver KV copies, the tied head's copy on the last stage and the vocabulary padding rows included.
- `owned`: elements counted once over the whole model, so that summing `owned` over every TP rank and
  stage gives the HF model's parameter count. A tensor counts where megatron-core's grad norm counts it
  (`param_is_not_tensor_parallel_duplicate`: TP-split weights on every rank, replicated ones and extra
  KV copies on one rank only), the tied head's copy (`shared`) never, and the padding rows of the
  vocabulary (`padded_vocab_size` - `vocab_size`) never: they are not HF parameters.
Frozen components (`--freeze-*`) are marked with the training code's own `freeze` before counting.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.meta_build import build_rank_on_meta, rank_view
from megatron_patch.training.freezing import COMPONENTS, component_parameters, freeze

_VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class RankParams:
    """The parameters of one (TP rank, stage) part."""

    tp_rank: int
    stage: int
    held: dict = field(default_factory=dict)
    """{component: elements stored}."""
    owned: dict = field(default_factory=dict)
    """{component: elements counted once over the model (sums to the HF count)}."""
    trainable: list = field(default_factory=list)
    """(elements, shared_embedding) of each trainable parameter in `named_parameters` order (DDP's)."""
    param_bytes: int = 0
    """Bytes of all parameters as built (frozen ones included)."""
    param_itemsize: int = 4

    @property
    def held_total(self) -> int:
        return sum(self.held.values())

    @property
    def trainable_total(self) -> int:
        return sum(n for n, _ in self.trainable)


def _padding_rows(tp_rank: int, tp: int, vocab: int, padded: int) -> int:
    per_rank = padded // tp
    start, end = tp_rank * per_rank, (tp_rank + 1) * per_rank
    return max(0, end - max(vocab, start))


def count_part(model, tp_rank: int, tp: int, stage: int) -> RankParams:
    """Census of a built part; call inside `rank_view` of the same rank (TP-duplicate test)."""
    out = RankParams(tp_rank, stage)
    configs = model.configs
    pad = _padding_rows(tp_rank, tp, configs.vocab_size, configs.padded_vocab_size)
    for component in COMPONENTS:
        held = owned = 0
        for name, param in component_parameters(model, component):
            n = param.numel()
            held += n
            if param_is_not_tensor_parallel_duplicate(param) and not getattr(param, "shared", False):
                owned += n - (pad * param.shape[1] if name.endswith(_VOCAB_TENSORS) else 0)
        out.held[component], out.owned[component] = held, owned
    for _, param in model.named_parameters():
        out.param_bytes += param.numel() * param.element_size()
        out.param_itemsize = param.element_size()
        if param.requires_grad:
            out.trainable.append((param.numel(), bool(getattr(param, "shared_embedding", False))))
    return out


def census(hf_config, opts: ParallelOptions, frozen=()) -> dict[tuple[int, int], RankParams]:
    """{(stage, TP rank): RankParams} for every part of layout `opts` (DP replicas hold the same)."""
    tp, pp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size
    out = {}
    for stage in range(pp):
        for tp_rank in range(tp):
            model = build_rank_on_meta(hf_config, opts, tp_rank, stage)
            freeze(model, frozen)
            with rank_view(tp, pp, tp_rank, stage):
                out[(stage, tp_rank)] = count_part(model, tp_rank, tp, stage)
            del model
    return out


def hf_parameter_count(hf_config) -> int:
    """transformers' own count of the HF model (built on meta; a tied head counted once)."""
    from transformers import Idefics2ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(hf_config)
    return sum(p.numel() for p in model.parameters())
