"""Perceiver resampler: learned latents cross-attend to each image's real patches, tensor parallel.

Per image, keys/values are concat(image patches, latents) and queries are the latents (Idefics2's
design). Only real patches are packed (no padding), so the attention is variable-length: one packed
batch with `cu_seqlens`, run by `varlen_attention`.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_patch.models.idefics2.kv_replication import copy_from_primary, groups_per_rank, kv_copies, mark_copy
from megatron_patch.models.idefics2.norms import TorchNorm
from megatron_patch.models.idefics2.swiglu import SwiGLUMLP
from megatron_patch.models.idefics2.varlen_attention import varlen_attention


def _rms_norm(config: TransformerConfig) -> nn.Module:
    return TorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


def gated_mlp(config: TransformerConfig, input_size: int | None = None) -> MLP:
    """megatron-core MLP with gate and up fused in linear_fc1 (SwiGLU-style)."""
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SwiGLUMLP(config, submodules, input_size=input_size)


class PackedImages:
    """Index bookkeeping shared by every perceiver layer for one batch of images, made once per forward.

    `total_patches` and `max_patches` (the sum and max of `patches_per_image`) size the index tensors;
    given from the host (the collator's counts), nothing here or in the layers waits for the device.
    Left None they are read back from `patches_per_image` (a host sync on a GPU, once per forward)."""

    def __init__(self, patches_per_image: torch.Tensor, num_latents: int, total_patches: Optional[int] = None,
                 max_patches: Optional[int] = None):
        device = patches_per_image.device
        n = patches_per_image.numel()
        self.num_images, self.num_latents = n, num_latents
        kv_lengths = patches_per_image + num_latents
        self.cu_seqlens_q = torch.arange(0, (n + 1) * num_latents, num_latents, device=device, dtype=torch.int32)
        self.cu_seqlens_k = torch.nn.functional.pad(kv_lengths.cumsum(0), (1, 0)).to(torch.int32)
        if max_patches is None:
            max_patches = int(patches_per_image.max()) if n else 0
        self.max_seqlen_k = max_patches + num_latents
        # Order of concat(all patches, all latents) rows that lays out [patches_i, latents_i] per image.
        if total_patches is None:
            total_patches = int(patches_per_image.sum())
        total_kv = total_patches + n * num_latents
        image = torch.repeat_interleave(torch.arange(n, device=device), kv_lengths, output_size=total_kv)
        local = torch.arange(total_kv, device=device) - self.cu_seqlens_k[image].long()
        patches = patches_per_image[image]
        patch_start = self.cu_seqlens_k[image].long() - image * num_latents
        latent_row = total_patches + image * num_latents + local - patches
        self.kv_order = torch.where(local < patches, patch_start + local, latent_row)


class PerceiverAttention(MegatronModule):
    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp
        groups = config.num_query_groups
        self.groups_per_rank = groups_per_rank(groups, tp)
        copies = kv_copies(groups, tp)  # > 1: TP exceeds the KV heads, each rank holds its group's copy
        linear = dict(config=config, init_method=config.init_method, bias=False)
        self.linear_q = ColumnParallelLinear(
            config.hidden_size, config.num_attention_heads * self.head_dim, gather_output=False, **linear
        )
        # k and v fused, interleaved per query group: [k_g, v_g] for each group g.
        self.linear_kv = ColumnParallelLinear(
            config.hidden_size, 2 * groups * copies * self.head_dim, gather_output=False, **linear
        )
        if copies > 1:
            mark_copy(self.linear_kv.weight, copies, parallel_state.get_tensor_model_parallel_rank())
            if config.perform_initialization:  # megatron-core drew a different slice on each copy
                copy_from_primary([self.linear_kv.weight])
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, latents: torch.Tensor, context: torch.Tensor, packed: PackedImages) -> torch.Tensor:
        """latents [n*L, 1, h], context [patches, 1, h] -> [n*L, 1, h]."""
        d = self.head_dim
        q, _ = self.linear_q(latents)
        kv, _ = self.linear_kv(torch.cat([context, latents], dim=0))
        kv = kv[packed.kv_order].view(-1, self.groups_per_rank, 2, d)
        dropout_p = self.config.attention_dropout if self.training else 0.0

        def attend():
            return varlen_attention(
                q.view(-1, self.heads_per_rank, d),
                kv[:, :, 0],
                kv[:, :, 1],
                packed.cu_seqlens_q,
                packed.cu_seqlens_k,
                packed.num_latents,
                packed.max_seqlen_k,
                scale=d**-0.5,
                dropout_p=dropout_p,
            )

        if dropout_p > 0.0:  # TP ranks hold different heads: each drops from its own model-parallel stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        out, _ = self.linear_proj(out.reshape(latents.shape[0], 1, -1))
        return out


class PerceiverLayer(MegatronModule):
    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.input_latents_norm = _rms_norm(config)
        self.input_context_norm = _rms_norm(config)
        self.self_attention = PerceiverAttention(config)
        self.pre_mlp_layernorm = _rms_norm(config)
        self.mlp = gated_mlp(config)

    def forward(self, latents, context, packed: PackedImages):
        latents = latents + self.self_attention(
            self.input_latents_norm(latents), self.input_context_norm(context), packed
        )
        out, _ = self.mlp(self.pre_mlp_layernorm(latents))
        return latents + out


class PerceiverResampler(MegatronModule):
    def __init__(self, config: TransformerConfig, num_latents: int):
        super().__init__(config=config)
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.ones(num_latents, config.hidden_size, dtype=config.params_dtype))
        self.layers = nn.ModuleList([PerceiverLayer(config) for _ in range(config.num_layers)])
        self.final_layernorm = _rms_norm(config)

    def forward(self, context: torch.Tensor, patches_per_image: torch.Tensor, total_patches: Optional[int] = None,
                max_patches: Optional[int] = None) -> torch.Tensor:
        """context [total_real_patches, h] packed image by image -> [num_images, num_latents, h]."""
        packed = PackedImages(patches_per_image, self.num_latents, total_patches, max_patches)
        latents = self.latents.repeat(packed.num_images, 1).unsqueeze(1)
        context = context.unsqueeze(1)
        for layer in self.layers:
            latents = layer(latents, context, packed)
        return self.final_layernorm(latents).view(packed.num_images, self.num_latents, -1)
