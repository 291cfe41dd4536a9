"""LoRA adapters on megatron-core linears, one adapter per HF projection.

    add_lora(model, LoraSettings(rank=8, alpha=16), opts, hf_config)   # after the base weights, before DDP
    load_peft_adapter(model, folder, settings, hf_config, opts)         # fill them from a peft folder

An adapter adds `scale * B(A(dropout(x)))` (scale = alpha / rank, as peft) to its projection's output.
Which projections carry one is `LoraSettings.targets` (weight_mapping.py's LORA_PROJECTIONS: the
language model's by default; the vision tower's, the perceiver's and the modality projection's too).
Where megatron-core fuses projections (qkv, the perceiver's kv, gated fc1), each HF projection keeps
its own A and B, so a peft adapter maps in and out exactly. The adapters are child modules of the base
linear, whose own parameter names do not change; a forward hook adds their output:

    language_model.decoder.layers.N.self_attention.linear_qkv.lora_{q,k,v}_proj.linear_{in,out}.weight
    language_model.decoder.layers.N.mlp.linear_fc2.lora_down_proj.linear_{in,out}.weight
    vision_model.decoder.layers.N.mlp.linear_fc1.lora_fc1.linear_{in,out}.weight
    connector.perceiver.layers.N.self_attention.linear_kv.lora_{k,v}_proj.linear_{in,out}.weight

`linear_in` is peft's lora_A ([rank, in]), `linear_out` its lora_B ([out, rank]) (Megatron-Bridge's names).

Tensor parallelism follows the base linear:
- column-parallel base (linear_qkv, linear_kv, linear_q, linear_fc1): A replicated, B split on its output rows like the base
  weight (qkv: each rank's q, k, v rows land in megatron-core's per-query-group interleaving
  [q heads of g; k_g; v_g]; kv: [k_g; v_g]; gated fc1: [gate_r; up_r]). The rank-wide A output enters the TP region like the
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

from megatron_patch.models.idefics2.weight_mapping import (
    KV,
    LORA_COMPONENTS,
    LORA_PREFIX,
    QKV,
    ROW,
    adapter_mappings,
    tensor_mappings,
)

# peft's usual choice: every projection of the language model's layers.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = DEFAULT_TARGETS
    modules_to_save: tuple = ()  # peft's modules_to_save: trained fully beside the adapters

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_record(cls, record: dict) -> "LoraSettings":
        """From a LoRA checkpoint's record (checkpoint_info.json's "lora")."""
        return cls(int(record["rank"]), float(record["alpha"]), float(record["dropout"]), tuple(record["targets"]),
                   tuple(record["modules_to_save"]))


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
    """{projection: this rank's output} -> the (fused) column-parallel linear's output layout on this
    rank: per group (query group for qkv: [q heads of g; k_g; v_g]; kv: [k_g; v_g]; one group for a
    gated fc1, [gate_r; up_r], or a single projection), each projection's share in `order`; a
    projection without an adapter contributes zeros."""

    def layout(parts):
        some = next(iter(parts.values()))
        lead = some.shape[:-1]
        full = [parts[n] if n in parts else some.new_zeros(*lead, local_sizes[n]) for n in order]
        shaped = [p.reshape(*lead, groups, p.shape[-1] // groups) for p in full]
        return torch.cat(shaped, dim=-1).reshape(*lead, -1)

    return layout


def _column_layout(base, linear, tp_size: int):
    """(projections in fused order, this rank's output rows of each, groups) of a column-parallel
    base linear, from its weight mapping (split rule and heads)."""
    order = tuple(name.rsplit(".", 2)[-2] for name in base.hf)  # "...self_attn.q_proj.weight" -> "q_proj"
    if base.split in (QKV, KV):
        heads, groups, head_dim = base.heads
        if tp_size > groups:
            raise ValueError(f"LoRA on {base.mcore}: its {groups} key/value heads are copied over {tp_size} TP ranks; "
                             f"use a TP size of at most {groups} or leave its k_proj and v_proj out of the targets")
        rows = {"q_proj": heads * head_dim, "k_proj": groups * head_dim, "v_proj": groups * head_dim}
        return order, {n: rows[n] // tp_size for n in order}, groups // tp_size
    local = linear.output_size_per_partition
    return order, {n: local // len(order) for n in order}, 1  # gated fc1: [gate_r; up_r]; or one projection


def _attach(linear, base, names: tuple, settings: LoraSettings, generator, tp_rank: int, tp_size: int) -> None:
    """Adapters for `names` (HF projections) on one base linear, whose weight mapping is `base`."""
    dtype, device = linear.weight.dtype, linear.weight.device
    if base.split != ROW:
        order, local, groups = _column_layout(base, linear, tp_size)
        for n in names:
            adapter = Adapter(linear.input_size, local[n], settings.rank, dtype, device)
            _init(adapter, generator, linear.input_size, tp_rank, tp_size)
            _mark(adapter.linear_in.weight, None, linear.sequence_parallel)
            _mark(adapter.linear_out.weight, 0, False)
            linear.add_module(LORA_PREFIX + n, adapter)
        hook = _LinearLoRA(linear, "column", names, settings, _fused_layout(order, local, groups))
    else:
        adapter = Adapter(linear.input_size_per_partition, linear.output_size, settings.rank, dtype, device)
        _init(adapter, generator, linear.input_size, tp_rank, tp_size)
        _mark(adapter.linear_in.weight, 1, False)
        _mark(adapter.linear_out.weight, None, linear.sequence_parallel)
        linear.add_module(LORA_PREFIX + names[0], adapter)
        hook = _LinearLoRA(linear, "row", names, settings, None)
    linear.register_forward_hook(hook)


def add_lora(model, settings: LoraSettings, opts, hf_config, seed: int = 0) -> None:
    """Give this rank's targeted linears their adapters (A: peft's kaiming init, B: zeros).

    A is drawn for the full (unsplit) shape from `seed`, the component and the layer, then this rank's
    part taken, so every layout starts from the same adapter."""
    from megatron.core import parallel_state

    from megatron_patch.models.idefics2.model_loading import stage_mappings

    if opts.uses_transformer_engine():  # TE fuses the input norm into linear_qkv / linear_fc1
        raise ValueError("LoRA needs the local layers (--transformer-impl local): transformer-engine's "
                         "linear_qkv and linear_fc1 take the input before its norm")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    bases = {m.mcore: m for m in tensor_mappings(hf_config)}
    linears = {}  # local linear path -> (its weight's mapping, [projections], generator key)
    for local, m in stage_mappings(hf_config, opts, stage, adapter_mappings(hf_config, settings.targets)).items():
        if not local.endswith("linear_in.weight"):
            continue
        path, projection = local.rsplit(".", 2)[0].split("." + LORA_PREFIX)
        global_path = m.mcore.rsplit(".", 2)[0].split("." + LORA_PREFIX)[0]
        entry = linears.setdefault(path, (bases[global_path + ".weight"], [], _generator_key(global_path)))
        entry[1].append(projection)
    generators = {}
    for path, (base, names, key) in linears.items():
        if key not in generators:
            generators[key] = torch.Generator().manual_seed(seed * 1000003 + key)
        _attach(model.get_submodule(path), base, tuple(names), settings, generators[key], tp_rank, tp_size)
    for block in ("language_model.decoder", "vision_model.decoder"):
        prefix = block + "."
        if any(path.startswith(prefix) for path in linears):
            model.get_submodule(block).register_forward_pre_hook(_input_requires_grad, with_kwargs=True)


def _generator_key(global_path: str) -> int:
    """One random stream per layer of each component (the language model's: its layer number)."""
    for offset, (component, (mcore_prefix, _, _)) in enumerate(LORA_COMPONENTS.items()):
        head = mcore_prefix.split("{i}")[0]
        if global_path.startswith(head):
            rest = global_path[len(head):].split(".", 1)[0]
            return 1000 * offset + (int(rest) if rest.isdigit() else 0) + 1
    raise ValueError(f"{global_path} is not in a LoRA component")


def _input_requires_grad(block, args, kwargs):
    """A frozen embedding's output needs no grad; with full recompute a checkpointed layer whose
    input needs none gives its adapters none either (as gradient checkpointing with peft needs
    `enable_input_require_grads`). A later stage's input, received from the previous one, needs it."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if torch.is_tensor(hidden) and not hidden.requires_grad:
        hidden.requires_grad_(True)
