"""SigLIP vision transformer with Idefics2's variable-resolution patch embedding, tensor parallel.

Images of different sizes share one padded batch. Patches that are padding are excluded from every
attention as keys (padding mask), and each image's real patches get position ids bucketed from their
fractional coordinates, so an image sees the same positions whatever it is padded to.
"""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn

from megatron_patch.models.idefics2.layer_specs import vision_block_spec


def patch_attention_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, H, W] pixel mask -> [N, H/p, W/p] patch mask: a patch is real when all its pixels are."""
    grid = pixel_attention_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return grid.sum(dim=(-1, -2)) == patch_size * patch_size


def bucketed_position_ids(patch_mask: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """Position ids [N, h*w]: each real patch's fractional (row, col) bucketed onto the trained grid."""
    n, max_h, max_w = patch_mask.shape
    device = patch_mask.device
    rows = patch_mask[:, :, 0].sum(dim=1)
    cols = patch_mask[:, 0, :].sum(dim=1)
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device)
    frac_h = torch.arange(max_h, device=device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(max_w, device=device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * num_patches_per_side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


def _construct(cls, *args, **kwargs) -> nn.Module:
    return cls(*args, **kwargs)


def _allocate(cls, *args, **kwargs) -> nn.Module:
    # skip_init builds on the meta device and allocates on `device` (its default would be the CPU).
    return nn.utils.skip_init(cls, *args, device=torch.get_default_device(), **kwargs)


class VisionEmbeddings(nn.Module):
    """Patch convolution + learned position table; replicated over TP ranks (small, and SigLIP-shaped).

    With `init=False` (weights are loaded next, megatron-core's `perform_initialization` off) the two
    modules are allocated on the default device without torch's random init, like megatron-core's own.
    """

    def __init__(self, hidden_size: int, patch_size: int, image_size: int, num_channels: int = 3, dtype=None,
                 init: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches_per_side = image_size // patch_size
        make = _construct if init else _allocate
        self.patch_embedding = make(nn.Conv2d, num_channels, hidden_size, patch_size, stride=patch_size, dtype=dtype)
        self.position_embedding = make(nn.Embedding, self.num_patches_per_side**2, hidden_size, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeds = embeds.flatten(2).transpose(1, 2)  # [N, h*w, hidden]
        positions = bucketed_position_ids(patch_mask, self.num_patches_per_side)
        return embeds + self.position_embedding(positions)


class VisionTransformer(MegatronModule):
    """Idefics2 SigLIP encoder: embeddings -> megatron-core TransformerBlock -> post LayerNorm."""

    def __init__(self, config: TransformerConfig, patch_size: int, image_size: int, use_te: bool = False):
        super().__init__(config=config)
        self.patch_size = patch_size
        self.embeddings = VisionEmbeddings(
            config.hidden_size, patch_size, image_size, dtype=config.params_dtype, init=config.perform_initialization
        )
        # post_layer_norm=True gives the block a final LayerNorm: SigLIP's post_layernorm.
        self.decoder = TransformerBlock(config, vision_block_spec(config, use_te), post_layer_norm=True)

    def set_input_tensor(self, input_tensor) -> None:  # the tower never receives pipeline input
        pass

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] real images + [N, H/p, W/p] patch mask -> [N, h*w, hidden] (padding rows are junk)."""
        hidden = self.embeddings(pixel_values, patch_mask).transpose(0, 1).contiguous()  # [s, b, h]
        # megatron-core masks where the mask is True: mark padding keys.
        key_padding = ~patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        hidden = self.decoder(hidden, attention_mask=key_padding)
        return hidden.transpose(0, 1)
