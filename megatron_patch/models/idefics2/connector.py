"""Connector: gated-MLP modality projection (vision width -> LLM width), then the perceiver resampler."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_patch.models.idefics2.perceiver import PerceiverResampler, gated_mlp


class Connector(MegatronModule):
    def __init__(self, projection: TransformerConfig, perceiver: TransformerConfig, vision_hidden: int, num_latents: int):
        super().__init__(config=perceiver)
        self.modality_projection = gated_mlp(projection, input_size=vision_hidden)
        self.perceiver = PerceiverResampler(perceiver, num_latents)

    def forward(self, patches: torch.Tensor, patches_per_image: torch.Tensor, total_patches: Optional[int] = None,
                max_patches: Optional[int] = None) -> torch.Tensor:
        """patches [total_real_patches, vision_hidden] -> image features [num_images, latents, hidden];
        `total_patches` / `max_patches`: the sum and max of `patches_per_image` when known on the host."""
        projected, _ = self.modality_projection(patches.unsqueeze(1))
        return self.perceiver(projected.squeeze(1), patches_per_image, total_patches, max_patches)
