"""ModuleSpecs for the Idefics2 towers: local (torch) layers, or transformer-engine layers when asked for.

Local layers use megatron-core's local spec with `TorchNorm` for every norm, so --sequence-parallel
works without transformer-engine too, and `SDPAttention` (torch SDPA) as core attention instead of
megatron-core's unfused `DotProductAttention`, which materialises every [s, s] score matrix, and
`SwiGLUMLP` (megatron-core's MLP whose unfused SwiGLU keeps one tensor for backward, not four).

Parameter names in checkpoints are the canonical megatron-core ones (TE-style: the layer norms that TE
fuses into the following linear are stored as `...linear_qkv.layer_norm_weight` and
`...linear_fc1.layer_norm_weight`); `canonical_to_module_name` maps them to the local modules' names.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_patch.models.idefics2.norms import TorchNorm
from megatron_patch.models.idefics2.sdpa_attention import SDPAttention
from megatron_patch.models.idefics2.swiglu import SwiGLUMLP

# Canonical (TE-fused) name fragment -> local spec's module name fragment.
_LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def _rename(name: str, use_te: bool, pairs) -> str:
    # Only TransformerBlock layers have TE-fused norms; the perceiver's own norms keep their names.
    if use_te or ".decoder.layers." not in name:
        return name
    for old, new in pairs:
        if old in name:
            return name.replace(old, new)
    return name


def canonical_to_module_name(name: str, use_te: bool) -> str:
    """Name of a canonical checkpoint parameter inside a model built with (use_te) specs."""
    return _rename(name, use_te, _LOCAL_NAMES.items())


def module_to_canonical_name(name: str, use_te: bool) -> str:
    """Canonical checkpoint name of a parameter of a model built with (use_te) specs."""
    return _rename(name, use_te, [(local, canonical) for canonical, local in _LOCAL_NAMES.items()])


def _layer_spec(use_te: bool) -> ModuleSpec:
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec()
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    )
    mlp = _with_mlp_class(spec.submodules.mlp, SwiGLUMLP)
    local = dict(input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm, self_attention=attention, mlp=mlp)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **local))


class _MLPSubclassIsKnown(logging.Filter):
    """megatron-core 0.16's TransformerLayer logs "Unknown MLP type" for any MLP subclass in a
    ModuleSpec (it compares `module == MLP`), then builds it with its default arguments, which take
    the TP group from the parallel state: what SwiGLUMLP needs. The line would only be noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def _with_mlp_class(mlp, cls):
    """The MLP entry of a layer spec building `cls` instead: a `ModuleSpec` up to megatron-core 0.16,
    from 0.17 on a `functools.partial` of `MLP.as_mlp_submodule` (a classmethod, so `cls`'s is used)."""
    if isinstance(mlp, functools.partial):
        return functools.partial(cls.as_mlp_submodule, *mlp.args, **mlp.keywords)
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _MLPSubclassIsKnown) for f in layer_logger.filters):
        layer_logger.addFilter(_MLPSubclassIsKnown())
    return dataclasses.replace(mlp, module=cls)


def _block_spec(layer: ModuleSpec, num_layers: int, use_te: bool):
    """The layer spec as is for TE (megatron-core adds TE's final norm), else whole-block submodules
    whose final norm is `TorchNorm` too."""
    if use_te:
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TorchNorm)


def language_block_spec(config: TransformerConfig, use_te: bool):
    """Mistral / Llama decoder layers of this pipeline stage: causal self-attention (GQA, RoPE),
    SwiGLU MLP, RMSNorm (config.normalization)."""
    return _block_spec(_layer_spec(use_te), get_num_layers_to_build(config), use_te)


def vision_block_spec(config: TransformerConfig, use_te: bool):
    """SigLIP encoder layers: bidirectional self-attention over real patches (padding mask), LayerNorm."""
    spec = _layer_spec(use_te)
    attention = dataclasses.replace(
        spec.submodules.self_attention, params={"attn_mask_type": AttnMaskType.padding}
    )
    submodules = dataclasses.replace(spec.submodules, self_attention=attention)
    return _block_spec(dataclasses.replace(spec, submodules=submodules), config.num_layers, use_te)
