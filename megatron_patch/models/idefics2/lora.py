"""LoRA adapters on the language model's megatron-core linears, one adapter per HF projection.

    add_lora(model, LoraSettings(rank=8, alpha=16), opts)   # after the base weights are loaded, before DDP
    load_peft_adapter(model, folder, settings, hf_config, opts)   # fill them from a peft folder

An adapter adds `scale * B(A(dropout(x)))` (scale = alpha / rank, as peft) to its projection's output.
Where megatron-core fuses projections, each HF projection keeps its own A and B, so a peft adapter maps
in and out exactly. The adapters are child modules of the base linear, whose own parameter names do not
change; a forward hook adds their output:

    language_model.decoder.layers.N.self_attention.linear_qkv.lora_{q,k,v}_proj.linear_{in,out}.weight
    language_model.decoder.layers.N.self_attention.linear_proj.lora_o_proj.linear_{in,out}.weight
    language_model.decoder.layers.N.mlp.linear_fc1.lora_{gate,up}_proj.linear_{in,out}.weight
    language_model.decoder.layers.N.mlp.linear_fc2.lora_down_proj.linear_{in,out}.weight

`linear_in` is peft's lora_A ([rank, in]), `linear_out` its lora_B ([out, rank]) (Megatron-Bridge's names).

Tensor parallelism follows the base linear:
- column-parallel base (linear_qkv, linear_fc1): A replicated, B split on its output rows like the base
  weight (qkv: each rank's q, k, v rows land in megatron-core's per-query-group interleaving
  [q heads of g; k_g; v_g]; fc1: [gate_r; up_r]). The rank-wide A output enters the TP region like the
  base's input: `copy_to_tensor_model_parallel_region` (backward all-reduce), or with sequence
  parallel, A runs on the local sequence chunk and its output is all-gathered (A's grad is then a
  partial sum over the sequence: marked `sequence_parallel` so grad finalisation sums it over TP).
- row-parallel base (linear_proj, linear_fc2): A split on its input columns like the base weight,
  B replicated. The partial A output is reduced with the same collective as the base's partial output
  (all-reduce, or reduce-scatter over the sequence with sequence parallel) before B; since B is
  linear this equals adding B's partial output before the base's reduction, at rank width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_patch.models.idefics2.weight_mapping import COLUMN, LORA_PREFIX, LORA_PROJECTIONS

DEFAULT_TARGETS = tuple(LORA_PROJECTIONS)
_ORDER = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_fc1": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_record(cls, record: dict) -> "LoraSettings":
        """From a LoRA checkpoint's record (checkpoint_info.json's "lora")."""
        return cls(int(record["rank"]), float(record["alpha"]), float(record["dropout"]), tuple(record["targets"]))


class Adapter(nn.Module):
    """One projection's A (`linear_in`, [rank, in]) and B (`linear_out`, [out, rank]) on this TP rank."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype, device):
        super().__init__()
        self.linear_in = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.linear_out = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)


def _mark(param, split_dim, sequence_parallel: bool) -> None:
    if split_dim is None:
        tensor_parallel.set_tensor_model_parallel_attributes(param, False, 0, 1)
    else:
        tensor_parallel.set_tensor_model_parallel_attributes(param, True, split_dim, 1)
    param.sequence_parallel = sequence_parallel  # grad is a partial sum over the sequence: summed over TP


def _init(adapter: Adapter, generator, full_in: int, tp_rank: int, tp_size: int) -> None:
    """peft's init: A kaiming-uniform(a=sqrt(5)) (nn.Linear's) drawn at its full [rank, in] shape, then
    this rank's columns taken when A is split; B zeros."""
    with torch.no_grad():
        weight = adapter.linear_in.weight
        bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
        full = torch.empty(weight.shape[0], full_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        if weight.shape[1] != full_in:
            full = full.chunk(tp_size, dim=1)[tp_rank]
        weight.copy_(full)
        adapter.linear_out.weight.zero_()


class _LinearLoRA:
    """The forward hook of one base linear: adds its adapters' output to the base's (output, bias)."""

    def __init__(self, linear, kind: str, names: tuple, settings: LoraSettings, layout):
        self.kind, self.names, self.scale, self.layout = kind, names, settings.scale, layout
        self.dropout = settings.dropout
        self.tp_group, self.sp = linear.tp_group, linear.sequence_parallel

    def _dropout(self, x, linear, split: bool):
        if not self.dropout or not linear.training:
            return x
        if split:  # rank-local values: rank-local masks, as megatron-core does for TP regions
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return nn.functional.dropout(x, self.dropout, True)
        return nn.functional.dropout(x, self.dropout, True)

    def __call__(self, linear, args, output):
        x = args[0]
        out, bias = output
        adapters = {n: getattr(linear, LORA_PREFIX + n) for n in self.names}
        if self.kind == "column":
            x = self._dropout(x, linear, split=self.sp)
            parts = {}
            for name, adapter in adapters.items():
                h = nn.functional.linear(x, adapter.linear_in.weight)
                if self.sp:
                    h = gather_from_sequence_parallel_region(h, group=self.tp_group)
                else:
                    h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
                parts[name] = nn.functional.linear(h, adapter.linear_out.weight)
            delta = self.layout(parts)
        else:
            x = self._dropout(x, linear, split=True)
            (adapter,) = adapters.values()
            h = nn.functional.linear(x, adapter.linear_in.weight)
            if self.sp:
                h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            delta = nn.functional.linear(h, adapter.linear_out.weight)
        return out + self.scale * delta.to(out.dtype), bias


def _fused_layout(order: tuple, local_sizes: dict, groups: int):
    """{projection: this rank's output} -> the fused linear's output layout on this rank: per group
    (query group for qkv: [q heads of g; k_g; v_g]; one group for fc1: [gate_r; up_r]), each projection's
    share in `order`; a projection without an adapter contributes zeros."""

    def layout(parts):
        some = next(iter(parts.values()))
        lead = some.shape[:-1]
        full = [parts[n] if n in parts else some.new_zeros(*lead, local_sizes[n]) for n in order]
        shaped = [p.reshape(*lead, groups, p.shape[-1] // groups) for p in full]
        return torch.cat(shaped, dim=-1).reshape(*lead, -1)

    return layout


def _attach(linear, path: str, names: tuple, settings: LoraSettings, generator, config, tp_rank: int,
            tp_size: int) -> None:
    dtype, device = linear.weight.dtype, linear.weight.device
    kind = "column" if LORA_PROJECTIONS[names[0]][2] == COLUMN else "row"
    if kind == "column":
        if path.endswith("linear_qkv"):
            d = config.kv_channels
            full = {"q_proj": config.num_attention_heads * d, "k_proj": config.num_query_groups * d,
                    "v_proj": config.num_query_groups * d}
            groups = config.num_query_groups // tp_size
        else:  # linear_fc1: [gate_r; up_r]
            full = dict.fromkeys(_ORDER["linear_fc1"], linear.output_size_per_partition * tp_size // 2)
            groups = 1
        local = {n: size // tp_size for n, size in full.items()}
        layout = _fused_layout(_ORDER[path.rsplit(".", 1)[-1]], local, groups)
        for n in names:
            adapter = Adapter(linear.input_size, local[n], settings.rank, dtype, device)
            _init(adapter, generator, linear.input_size, tp_rank, tp_size)
            _mark(adapter.linear_in.weight, None, linear.sequence_parallel)
            _mark(adapter.linear_out.weight, 0, False)
            linear.add_module(LORA_PREFIX + n, adapter)
    else:
        adapter = Adapter(linear.input_size_per_partition, linear.output_size, settings.rank, dtype, device)
        _init(adapter, generator, linear.input_size, tp_rank, tp_size)
        _mark(adapter.linear_in.weight, 1, False)
        _mark(adapter.linear_out.weight, None, linear.sequence_parallel)
        linear.add_module(LORA_PREFIX + names[0], adapter)
        layout = None
    linear.register_forward_hook(_LinearLoRA(linear, kind, names, settings, layout))


def add_lora(model, settings: LoraSettings, opts, seed: int = 0) -> None:
    """Give this rank's language-model linears their adapters (A: peft's kaiming init, B: zeros).

    A is drawn for the full (unsplit) shape from `seed` and the global layer index, then this rank's
    part taken, so every layout starts from the same adapter."""
    from megatron.core import parallel_state

    if opts.uses_transformer_engine():  # TE fuses the input norm into linear_qkv / linear_fc1
        raise ValueError("LoRA needs the local layers (--transformer-impl local): transformer-engine's "
                         "linear_qkv and linear_fc1 take the input before its norm")
    lm = getattr(model, "language_model", None)
    if lm is None or getattr(lm, "decoder", None) is None:
        return
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = lm.config
    for layer in lm.decoder.layers:
        generator = torch.Generator().manual_seed(seed * 1000003 + layer.layer_number)
        for linear_path, names in _linears(settings.targets):
            _attach(layer.get_submodule(linear_path), linear_path, names, settings, generator, config, tp_rank, tp_size)
    lm.decoder.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)


def _input_requires_grad(block, args, kwargs):
    """The frozen embedding's output needs no grad; with full recompute a checkpointed layer whose
    input needs none gives its adapters none either (as gradient checkpointing with peft needs
    `enable_input_require_grads`). A later stage's input, received from the previous one, needs it."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if torch.is_tensor(hidden) and not hidden.requires_grad:
        hidden.requires_grad_(True)


def _linears(targets) -> list:
    """[(linear path in a layer, HF projections on it in megatron's fused order)]."""
    out = {}
    for name in DEFAULT_TARGETS:
        if name in targets:
            out.setdefault(LORA_PROJECTIONS[name][1], []).append(name)
    return [(path, tuple(names)) for path, names in out.items()]


def adapters(model):
    """[(global layer index, HF projection, Adapter, base linear)] on this rank."""
    lm = getattr(model, "language_model", None)
    if lm is None or getattr(lm, "decoder", None) is None:
        return []
    out = []
    for layer in lm.decoder.layers:
        for path in dict.fromkeys(linear for _, linear, _ in LORA_PROJECTIONS.values()):
            linear = layer.get_submodule(path)
            for name, child in linear.named_children():
                if name.startswith(LORA_PREFIX):
                    out.append((layer.layer_number - 1, name[len(LORA_PREFIX):], child, linear))
    return out
