"""Connector: gated-MLP modality projection (vision width -> LLM width), then the perceiver resampler."""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_patch.models.idefics2.perceiver import PerceiverResampler, gated_mlp


class Connector(MegatronModule):
    def __init__(self, projection: TransformerConfig, perceiver: TransformerConfig, vision_hidden: int, num_latents: int):
        super().__init__(config=perceiver)
        self.modality_projection = gated_mlp(projection, input_size=vision_hidden)
        self.perceiver = PerceiverResampler(perceiver, num_latents)

    def forward(self, patches: torch.Tensor, patches_per_image: torch.Tensor) -> torch.Tensor:
        """patches [total_real_patches, vision_hidden] -> image features [num_images, latents, hidden]."""
        projected, _ = self.modality_projection(patches.unsqueeze(1))
        return self.perceiver(projected.squeeze(1), patches_per_image)
