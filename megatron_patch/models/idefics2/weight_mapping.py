"""The one HF <-> megatron-core weight mapping of Idefics2: declarative tables plus the split rules.

Each row says: megatron-core (canonical) name, HF name(s), and how the tensor is split over tensor-
parallel ranks. `{i}` is a layer index. Model loading, both checkpoint converters and the parity tool
all read these tables; nothing else in the project knows a parameter name.

Split rules:
- replicated: every TP rank holds the whole tensor.
- column / row: split along dim 0 / dim 1.
- vocab: rows padded with zeros to the padded vocabulary, then split along dim 0.
- gated: HF (gate, up) -> each split along dim 0, rank r holds [gate_r; up_r] (megatron's fused fc1).
- qkv: HF (q, k, v) -> interleaved per query group [q heads of g; k_g; v_g], then split along dim 0.
- kv: HF (k, v) -> interleaved per query group [k_g; v_g], then split along dim 0; with more TP
  ranks than groups (the perceiver at TP > its KV heads) rank r holds a copy of group
  r // (TP / groups), and merging reads one copy per group and refuses copies that differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_patch.models.idefics2.config import layers_per_stage, padded_vocab_size, tied_word_embeddings

REPLICATED, COLUMN, ROW, VOCAB, GATED, QKV, KV = "replicated", "column", "row", "vocab", "gated", "qkv", "kv"

# HF Idefics2 name parts, also used by the converters (source checks, tied head, compose's renaming).
HF_TEXT_PREFIX, HF_VISION_PREFIX, HF_CONNECTOR_PREFIX = "model.text_model.", "model.vision_model.", "model.connector."
HF_EMBED_TOKENS = HF_TEXT_PREFIX + "embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"

_VISION_LAYER = [
    ("self_attention.linear_qkv.layer_norm_weight", "layer_norm1.weight", REPLICATED),
    ("self_attention.linear_qkv.layer_norm_bias", "layer_norm1.bias", REPLICATED),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV),
    ("self_attention.linear_proj.weight", "self_attn.out_proj.weight", ROW),
    ("self_attention.linear_proj.bias", "self_attn.out_proj.bias", REPLICATED),
    ("mlp.linear_fc1.layer_norm_weight", "layer_norm2.weight", REPLICATED),
    ("mlp.linear_fc1.layer_norm_bias", "layer_norm2.bias", REPLICATED),
    ("mlp.linear_fc1.weight", "mlp.fc1.weight", COLUMN),
    ("mlp.linear_fc1.bias", "mlp.fc1.bias", COLUMN),
    ("mlp.linear_fc2.weight", "mlp.fc2.weight", ROW),
    ("mlp.linear_fc2.bias", "mlp.fc2.bias", REPLICATED),
]
_VISION = [
    ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight", REPLICATED),
    ("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias", REPLICATED),
    ("embeddings.position_embedding.weight", "embeddings.position_embedding.weight", REPLICATED),
    ("decoder.final_layernorm.weight", "post_layernorm.weight", REPLICATED),
    ("decoder.final_layernorm.bias", "post_layernorm.bias", REPLICATED),
]
_PERCEIVER_LAYER = [
    ("input_latents_norm.weight", "input_latents_norm.weight", REPLICATED),
    ("input_context_norm.weight", "input_context_norm.weight", REPLICATED),
    ("self_attention.linear_q.weight", "self_attn.q_proj.weight", COLUMN),
    ("self_attention.linear_kv.weight", ("self_attn.k_proj.weight", "self_attn.v_proj.weight"), KV),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", ROW),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", REPLICATED),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATED),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", ROW),
]
_CONNECTOR = [
    ("modality_projection.linear_fc1.weight", ("modality_projection.gate_proj.weight", "modality_projection.up_proj.weight"), GATED),
    ("modality_projection.linear_fc2.weight", "modality_projection.down_proj.weight", ROW),
    ("perceiver.latents", "perceiver_resampler.latents", REPLICATED),
    ("perceiver.final_layernorm.weight", "perceiver_resampler.norm.weight", REPLICATED),
]
_LANGUAGE_LAYER = [
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", REPLICATED),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", ROW),
    ("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", REPLICATED),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATED),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", ROW),
]


@dataclass(frozen=True)
class TensorMapping:
    """One megatron-core tensor (canonical global name) and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    split: str
    heads: Optional[tuple[int, int, int]] = None
    """(attention heads, query groups, head dim) for the qkv / kv rules."""
    vocab: Optional[int] = None
    """True vocabulary size, for the vocab rule (the padded size follows from the TP size)."""
    layer: Optional[int] = None
    """Global LLM layer index, for pipeline placement; None for non-layer tensors."""
    place: str = "first"
    """Pipeline placement: 'first' stage, 'last' stage, or 'layer' (the stage holding `layer`)."""


def _rows(table, mcore_prefix, hf_prefix, **extra) -> list[TensorMapping]:
    out = []
    for mcore, hf, split in table:
        hf = (hf,) if isinstance(hf, str) else hf
        out.append(TensorMapping(mcore_prefix + mcore, tuple(hf_prefix + h for h in hf), split, **extra))
    return out


def tensor_mappings(hf_config) -> list[TensorMapping]:
    """Every tensor of the full model, in a stable order (layout independent)."""
    v, p, t = hf_config.vision_config, hf_config.perceiver_config, hf_config.text_config
    vision_heads = (v.num_attention_heads, v.num_attention_heads, v.hidden_size // v.num_attention_heads)
    perceiver_heads = (p.resampler_n_heads, p.num_key_value_heads, p.resampler_head_dim)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    text_heads = (t.num_attention_heads, t.num_key_value_heads, head_dim)

    rows = _rows(_VISION, "vision_model.", HF_VISION_PREFIX)
    for i in range(v.num_hidden_layers):
        rows += _rows(_VISION_LAYER, f"vision_model.decoder.layers.{i}.", f"{HF_VISION_PREFIX}encoder.layers.{i}.", heads=vision_heads)
    rows += _rows(_CONNECTOR, "connector.", HF_CONNECTOR_PREFIX)
    for i in range(p.resampler_depth):
        rows += _rows(_PERCEIVER_LAYER, f"connector.perceiver.layers.{i}.", f"{HF_CONNECTOR_PREFIX}perceiver_resampler.layers.{i}.", heads=perceiver_heads)
    vocab = t.vocab_size
    rows.append(TensorMapping("language_model.embedding.word_embeddings.weight", (HF_EMBED_TOKENS,), VOCAB, vocab=vocab))
    for i in range(t.num_hidden_layers):
        rows += _rows(_LANGUAGE_LAYER, f"language_model.decoder.layers.{i}.", f"{HF_TEXT_PREFIX}layers.{i}.", heads=text_heads, layer=i, place="layer")
    rows.append(TensorMapping("language_model.decoder.final_layernorm.weight", (HF_TEXT_PREFIX + "norm.weight",), REPLICATED, place="last"))
    tied = tied_word_embeddings(hf_config)
    head = HF_EMBED_TOKENS if tied else HF_LM_HEAD
    rows.append(TensorMapping("language_model.output_layer.weight", (head,), VOCAB, vocab=vocab, place="last"))
    return rows


# LoRA adapters (models/idefics2/lora.py). A target is "projection" (of the language model's layers)
# or "component.projection", with HF names: `q_proj`, `vision_model.fc1`, `perceiver_resampler.k_proj`,
# `modality_projection.down_proj`. Each component: (megatron-core module prefix, HF module prefix; `{i}`
# is a layer index) and the config field counting its layers (None: one module, no layers).
LORA_COMPONENTS = {
    "text_model": ("language_model.decoder.layers.{i}.", HF_TEXT_PREFIX + "layers.{i}.", "text_config.num_hidden_layers"),
    "vision_model": ("vision_model.decoder.layers.{i}.", HF_VISION_PREFIX + "encoder.layers.{i}.",
                     "vision_config.num_hidden_layers"),
    "perceiver_resampler": ("connector.perceiver.layers.{i}.", HF_CONNECTOR_PREFIX + "perceiver_resampler.layers.{i}.",
                            "perceiver_config.resampler_depth"),
    "modality_projection": ("connector.modality_projection.", HF_CONNECTOR_PREFIX + "modality_projection.", None),
}
# (component, HF projection) -> (its HF module, the megatron-core linear holding it, that linear's
# split). Each projection has its own A (`linear_in`, peft's lora_A, [rank, in]) and B (`linear_out`,
# lora_B, [out, rank]), also inside fused linears (qkv, kv, gated fc1). They split like their base
# linear: a column-parallel base splits B on its output rows (the rank's share of the projection's
# rows: plain chunks of the HF rows, whatever the fused layout does with them) and keeps A whole; a
# row-parallel base splits A on its input columns and keeps B whole.
_ATTENTION_MLP = {"q_proj": ("self_attn.q_proj", "self_attention.linear_qkv", COLUMN),
                  "k_proj": ("self_attn.k_proj", "self_attention.linear_qkv", COLUMN),
                  "v_proj": ("self_attn.v_proj", "self_attention.linear_qkv", COLUMN),
                  "o_proj": ("self_attn.o_proj", "self_attention.linear_proj", ROW),
                  "gate_proj": ("mlp.gate_proj", "mlp.linear_fc1", COLUMN),
                  "up_proj": ("mlp.up_proj", "mlp.linear_fc1", COLUMN),
                  "down_proj": ("mlp.down_proj", "mlp.linear_fc2", ROW)}
LORA_PROJECTIONS = {
    **{("text_model", name): row for name, row in _ATTENTION_MLP.items()},
    **{("vision_model", name): row for name, row in _ATTENTION_MLP.items() if name in ("q_proj", "k_proj", "v_proj")},
    ("vision_model", "out_proj"): ("self_attn.out_proj", "self_attention.linear_proj", ROW),
    ("vision_model", "fc1"): ("mlp.fc1", "mlp.linear_fc1", COLUMN),
    ("vision_model", "fc2"): ("mlp.fc2", "mlp.linear_fc2", ROW),
    ("perceiver_resampler", "q_proj"): ("self_attn.q_proj", "self_attention.linear_q", COLUMN),
    ("perceiver_resampler", "k_proj"): ("self_attn.k_proj", "self_attention.linear_kv", COLUMN),
    ("perceiver_resampler", "v_proj"): ("self_attn.v_proj", "self_attention.linear_kv", COLUMN),
    **{("perceiver_resampler", name): _ATTENTION_MLP[name] for name in ("o_proj", "gate_proj", "up_proj", "down_proj")},
    ("modality_projection", "gate_proj"): ("gate_proj", "linear_fc1", COLUMN),
    ("modality_projection", "up_proj"): ("up_proj", "linear_fc1", COLUMN),
    ("modality_projection", "down_proj"): ("down_proj", "linear_fc2", ROW),
}
LORA_PREFIX = "lora_"  # adapter modules are children of their base linear: `linear_qkv.lora_q_proj`


def lora_target(component: str, projection: str) -> str:
    """The target's name: bare for the language model (peft's usual choice), qualified elsewhere."""
    return projection if component == "text_model" else f"{component}.{projection}"


ALL_LORA_TARGETS = tuple(lora_target(c, p) for c, p in LORA_PROJECTIONS)


def split_lora_target(target: str) -> tuple[str, str]:
    """"q_proj" -> ("text_model", "q_proj"); "vision_model.fc1" -> ("vision_model", "fc1")."""
    return tuple(target.split(".", 1)) if "." in target else ("text_model", target)


def lora_layers(hf_config, component: str) -> list:
    """Layer indices of a component ([None] for one without layers)."""
    field = LORA_COMPONENTS[component][2]
    if field is None:
        return [None]
    sub, name = field.split(".")
    return list(range(getattr(getattr(hf_config, sub), name)))


def adapter_mappings(hf_config, targets) -> list[TensorMapping]:
    """The LoRA adapters' tensors for `targets` (module comment), in a stable order: what a LoRA
    checkpoint holds. Language-model layers are placed on their stage, the rest on the first."""
    rows = []
    for (component, name), (module, linear, split) in LORA_PROJECTIONS.items():
        if lora_target(component, name) not in targets:
            continue
        mcore_prefix, hf_prefix, _ = LORA_COMPONENTS[component]
        a_split, b_split = (REPLICATED, COLUMN) if split == COLUMN else (ROW, REPLICATED)
        for i in lora_layers(hf_config, component):
            mcore = mcore_prefix.format(i=i) + f"{linear}.{LORA_PREFIX}{name}."
            hf = hf_prefix.format(i=i) + f"{module}."
            place = {"layer": i, "place": "layer"} if component == "text_model" else {}
            rows.append(TensorMapping(mcore + "linear_in.weight", (hf + "lora_A.weight",), a_split, **place))
            rows.append(TensorMapping(mcore + "linear_out.weight", (hf + "lora_B.weight",), b_split, **place))
    return rows


# peft's modules_to_save on Idefics2 (--lora-modules-to-save): modules that train fully beside the
# adapters, by the name peft matches (the end of the module's path) -> the HF tensors they hold (a prefix).
LORA_MODULES_TO_SAVE = {
    "vision_model": HF_VISION_PREFIX, "connector": HF_CONNECTOR_PREFIX,
    "perceiver_resampler": HF_CONNECTOR_PREFIX + "perceiver_resampler.",
    "modality_projection": HF_CONNECTOR_PREFIX + "modality_projection.",
    "embed_tokens": HF_EMBED_TOKENS, "lm_head": HF_LM_HEAD,
}


def saved_module_mappings(hf_config, modules) -> list[TensorMapping]:
    """The tensors of the modules a LoRA run trains fully (`modules`: LORA_MODULES_TO_SAVE names)."""
    prefixes = tuple(LORA_MODULES_TO_SAVE[name] for name in modules)
    return [m for m in tensor_mappings(hf_config) if prefixes and m.hf[0].startswith(prefixes)]


def targets_inside(modules, targets) -> list:
    """The LoRA targets that lie inside one of the modules trained fully (refused: peft would train a
    copy of the module and leave the adapter on the frozen original)."""
    prefixes = tuple(LORA_MODULES_TO_SAVE[name] for name in modules)
    return [t for t in targets if prefixes and LORA_COMPONENTS[split_lora_target(t)[0]][1].startswith(prefixes)]


def checkpoint_mappings(hf_config, adapter_targets=None, modules_to_save=()) -> list[TensorMapping]:
    """The tensors a checkpoint holds: the whole model, or a LoRA checkpoint's adapters and the
    modules it trains fully."""
    if adapter_targets is None:
        return tensor_mappings(hf_config)
    return adapter_mappings(hf_config, adapter_targets) + saved_module_mappings(hf_config, modules_to_save)


def adapter_base_weight(name: str) -> str:
    """The HF weight an adapter tensor belongs to: `...q_proj.lora_A.weight` -> `...q_proj.weight`."""
    return name.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")


def hf_tensor_names(hf_config) -> list[str]:
    """HF tensor names the model consists of (each once, in mapping order)."""
    seen = dict.fromkeys(name for m in tensor_mappings(hf_config) for name in m.hf)
    return list(seen)


# ---------------------------------------------------------------- pipeline placement


@dataclass(frozen=True)
class PipelineLayout:
    num_layers: int
    pipeline_size: int
    first_stage_layers: Optional[int] = None

    def stage_sizes(self) -> list[int]:
        return layers_per_stage(self.num_layers, self.pipeline_size, self.first_stage_layers)

    def stage_of_layer(self, layer: int) -> tuple[int, int]:
        """(stage, local index) of a global LLM layer."""
        start = 0
        for stage, size in enumerate(self.stage_sizes()):
            if layer < start + size:
                return stage, layer - start
            start += size
        raise IndexError(f"LLM layer {layer} is beyond the {self.num_layers} layers of the model")

    def placements(self, m: TensorMapping, tied: bool) -> list[tuple[int, str]]:
        """[(stage, local canonical name)] holding this tensor: a tied head lives on first and last stage."""
        last = self.pipeline_size - 1
        if m.place == "layer":
            stage, local = self.stage_of_layer(m.layer)
            prefix = f"language_model.decoder.layers.{m.layer}."
            return [(stage, m.mcore.replace(prefix, f"language_model.decoder.layers.{local}.", 1))]
        if m.place == "last":
            if m.mcore.endswith("output_layer.weight") and tied and last == 0:
                return []  # one stage: the head reads the embedding itself
            return [(last, m.mcore)]
        return [(0, m.mcore)]


# ---------------------------------------------------------------- tensor-parallel split rules


def _group_interleave(parts: Sequence[torch.Tensor], sizes: Sequence[int], groups: int) -> torch.Tensor:
    """Concatenate parts group by group: part j contributes sizes[j] rows to each group."""
    shaped = [x.reshape(groups, s, *x.shape[1:]) for x, s in zip(parts, sizes)]
    return torch.cat(shaped, dim=1).reshape(-1, *parts[0].shape[1:])


def _group_split(full: torch.Tensor, sizes: Sequence[int], groups: int) -> list[torch.Tensor]:
    grouped = full.reshape(groups, sum(sizes), *full.shape[1:])
    return [x.reshape(-1, *full.shape[1:]).contiguous() for x in torch.split(grouped, list(sizes), dim=1)]


def _group_sizes(m: TensorMapping) -> list[int]:
    heads, groups, head_dim = m.heads
    kv = [head_dim, head_dim]
    return ([heads // groups * head_dim] + kv) if m.split == QKV else kv


def hf_to_mcore(m: TensorMapping, hf: Sequence[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
    """The shard of tensor `m` that TP rank `tp_rank` of `tp_size` holds, from its HF tensors."""
    if m.split == REPLICATED:
        return hf[0]
    if m.split == COLUMN:
        return hf[0].chunk(tp_size, dim=0)[tp_rank]
    if m.split == ROW:
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if m.split == VOCAB:
        vocab = hf[0].shape[0]
        pad = padded_vocab_size(vocab, tp_size) - vocab
        full = torch.cat([hf[0], hf[0].new_zeros(pad, *hf[0].shape[1:])]) if pad else hf[0]
        return full.chunk(tp_size, dim=0)[tp_rank]
    if m.split == GATED:
        return torch.cat([x.chunk(tp_size, dim=0)[tp_rank] for x in hf])
    if m.split in (QKV, KV):
        full = _group_interleave(hf, _group_sizes(m), m.heads[1])
        copies = _kv_copies(m, tp_size)
        return full.chunk(tp_size // copies, dim=0)[tp_rank // copies]
    raise ValueError(f"unknown split rule {m.split!r} for {m.mcore}")


def mcore_to_hf(m: TensorMapping, shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """HF tensors (in `m.hf` order) from the TP shards of tensor `m` (rank order)."""
    if m.split == REPLICATED:
        return [shards[0]]
    if m.split == COLUMN:
        return [torch.cat(shards, dim=0)]
    if m.split == ROW:
        return [torch.cat(shards, dim=1)]
    if m.split == VOCAB:
        return [torch.cat(shards, dim=0)[: m.vocab]]
    if m.split == GATED:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if m.split in (QKV, KV):
        copies = _kv_copies(m, len(shards))
        return _group_split(torch.cat(_one_copy_per_group(m, shards, copies), dim=0), _group_sizes(m), m.heads[1])
    raise ValueError(f"unknown split rule {m.split!r} for {m.mcore}")


class KVCopyMismatch(ValueError):
    """TP ranks hold different copies of one replicated KV head: the checkpoint (or gradient) is not
    one model, and no copy can be chosen over the others."""


def _kv_copies(m: TensorMapping, tp_size: int) -> int:
    """TP ranks holding each query group of a qkv/kv tensor (1 unless TP exceeds the groups)."""
    groups = m.heads[1]
    if tp_size <= groups:
        return 1
    if m.split != KV or tp_size % groups:  # only the perceiver's own attention replicates KV heads
        raise ValueError(f"{m.mcore}: {tp_size} TP ranks cannot hold {groups} query groups; "
                         f"use a TP size that divides {groups}")
    return tp_size // groups


def _one_copy_per_group(m: TensorMapping, shards: Sequence[torch.Tensor], copies: int) -> list[torch.Tensor]:
    """The first copy of each group; KVCopyMismatch (one line) if another copy differs from it."""
    firsts = list(shards[::copies])
    for r, shard in enumerate(shards):
        if r % copies and not torch.equal(shard, firsts[r // copies]):
            first = r // copies * copies
            raise KVCopyMismatch(f"{m.mcore}: TP rank {r} holds a copy of KV group {r // copies} that differs from "
                                 f"TP rank {first}'s; the replicated KV heads are out of sync")
    return firsts
