"""Idefics2 on megatron-core: vision tower + connector + LLM, tensor and pipeline parallel.

Stage 0 holds the vision tower, the connector and the token embedding; it merges image features into
the text embeddings at `<image>` tokens. The LLM layers are split over all stages (megatron-core
GPTModel); the last stage holds the head and the loss. The vocabulary is padded to a TP multiple and
the padded logits are masked to -inf, so loss and softmax equal the unpadded model's.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule

from megatron_patch.models.idefics2.config import Idefics2Configs, ParallelOptions, build_configs
from megatron_patch.models.idefics2.connector import Connector
from megatron_patch.models.idefics2.image_counts import ImageCounts, ImageTokenMismatch, true_positions
from megatron_patch.models.idefics2.kv_replication import COPIES_ATTR
from megatron_patch.models.idefics2.layer_specs import language_block_spec
from megatron_patch.models.idefics2.sdpa_attention import row_segments
from megatron_patch.models.idefics2.vision import VisionTransformer, patch_attention_mask

__all__ = ["Idefics2Model", "ImageCounts", "ImageTokenMismatch", "build_model", "mark_tensor_parallel_weights"]


class Idefics2Model(MegatronModule):
    def __init__(self, configs: Idefics2Configs, pre_process: bool = True, post_process: bool = True, use_te: bool = False):
        super().__init__(config=configs.language)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's pipeline schedules
        self.configs = configs
        self.pre_process, self.post_process = pre_process, post_process
        self.use_te = use_te
        if pre_process:
            self.vision_model = VisionTransformer(configs.vision, configs.patch_size, configs.image_size, use_te)
            self.connector = Connector(
                configs.projection, configs.perceiver, configs.vision.hidden_size, configs.image_seq_len
            )
        self.language_model = GPTModel(
            config=configs.language,
            transformer_layer_spec=language_block_spec(configs.language, use_te),
            vocab_size=configs.padded_vocab_size,
            max_sequence_length=1 << 20,  # RoPE is computed for the actual length; no table to size
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=configs.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=configs.rope.theta,
            rope_scaling=configs.rope.scaling,
            rope_scaling_factor=configs.rope.scaling_factor,
        )
        if post_process and configs.padded_vocab_size != configs.vocab_size:
            self.language_model.output_layer.register_forward_hook(self._mask_padded_vocab)

    def _mask_padded_vocab(self, module, inputs, output):
        logits, bias = output
        per_rank = self.configs.padded_vocab_size // self.configs.language.tensor_model_parallel_size
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        padded = torch.arange(start, start + per_rank, device=logits.device) >= self.configs.vocab_size
        return logits.masked_fill(padded, float("-inf")), bias

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # megatron-core's grad finalisation asks the module holding `pre_process` (this one) for the
    # tied embedding, to sum its gradient over the first and last pipeline stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, pixel_values, pixel_attention_mask, image_mask, counts: ImageCounts) -> torch.Tensor:
        """Features [num_real_images, latents, hidden] of the images `image_mask` marks real, in batch order
        (`counts`: their sizes on the host, so no selection here waits for the device)."""
        if counts.images == 0:
            return pixel_values.new_zeros(0, self.configs.image_seq_len, self.configs.language.hidden_size)
        real = true_positions(image_mask, counts.images)
        images = pixel_values.flatten(0, 1)[real]
        patch_mask = patch_attention_mask(pixel_attention_mask.flatten(0, 1)[real].bool(), self.configs.patch_size)
        hidden = self.vision_model(images, patch_mask)
        flat_mask = patch_mask.flatten(1)
        patches = hidden.flatten(0, 1)[true_positions(flat_mask, counts.patches)]
        return self.connector(patches, flat_mask.sum(dim=1), counts.patches, counts.max_patches)

    def _vision_trains(self) -> bool:
        """True when a backward pass will follow and the vision tower or connector has trainable weights."""
        return torch.is_grad_enabled() and any(
            p.requires_grad for module in (self.vision_model, self.connector) for p in module.parameters()
        )

    def _blank_image_features(self) -> torch.Tensor:
        """Features of one all-zero image of a single patch (text-only micro-batches in training)."""
        p = self.configs.patch_size
        weight = next(self.vision_model.parameters())
        image = torch.zeros(1, 3, p, p, dtype=weight.dtype, device=weight.device)
        patch_mask = torch.ones(1, 1, 1, dtype=torch.bool, device=weight.device)
        hidden = self.vision_model(image, patch_mask)
        return self.connector(hidden.reshape(1, -1), patch_mask.flatten(1).sum(dim=1), 1, 1)

    def embed(self, input_ids, position_ids, pixel_values=None, pixel_attention_mask=None, image_mask=None,
              image_counts: Optional[ImageCounts] = None):
        """Token embeddings [s, b, h] (sequence-parallel split when enabled) with image features merged in.

        `image_counts` (the collator's sizes, on the host) spare the reads that measure them here."""
        tp = self.configs.language.tensor_model_parallel_size
        if self.configs.language.sequence_parallel and input_ids.shape[1] % tp != 0:
            raise ValueError(
                f"--sequence-parallel splits the sequence over {tp} TP ranks, but the micro-batch has "
                f"{input_ids.shape[1]} tokens per row; make --seq-length a multiple of {tp}"
            )
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        counts = image_counts or ImageCounts.measure(
            input_ids, image_mask, pixel_attention_mask, self.configs.image_token_id, self.configs.patch_size)
        counts.check(self.configs.image_seq_len)
        if counts.images == 0:
            if self._vision_trains():
                # DDP waits for a gradient of every trainable parameter on every micro-batch: run the
                # vision tower and connector on one blank patch and add its features times zero.
                return embeddings + 0.0 * self._blank_image_features().sum().to(embeddings.dtype)
            return embeddings
        features = self.image_features(pixel_values, pixel_attention_mask, image_mask, counts)
        is_image = input_ids == self.configs.image_token_id
        width = features.shape[-1]
        merged = torch.zeros(input_ids.numel(), width, dtype=embeddings.dtype, device=embeddings.device)
        merged[true_positions(is_image, counts.images * self.configs.image_seq_len)] = \
            features.reshape(-1, width).to(embeddings.dtype)
        merged = merged.view(*input_ids.shape, width)
        merged, is_image = merged.transpose(0, 1).contiguous(), is_image.transpose(0, 1).contiguous()
        if self.configs.language.sequence_parallel:
            merged = tensor_parallel.scatter_to_sequence_parallel_region(merged)
            is_image = tensor_parallel.scatter_to_sequence_parallel_region(is_image)
        return torch.where(is_image.unsqueeze(-1), merged, embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        image_counts: Optional[ImageCounts] = None,
    ) -> torch.Tensor:
        """Per-token loss [b, s] when `labels` (already shifted) are given, else vocab-parallel logits [b, s, v/tp].

        input_ids and position_ids [b, s] are read on the first stage only (None elsewhere is fine).
        pixel_values [b, max_images, 3, H, W], pixel_attention_mask [b, max_images, H, W] and
        image_mask [b, max_images] (True for real images) too; `image_counts` are their sizes on the
        host (training passes the collator's; without them the first stage measures them, reading the
        tensors back once per forward). `cu_seqlens` ([S + 1] int32 boundaries over the b-major
        flattened [b * s] tokens, covering all of them, `data/collate.py`) marks several samples per
        row: attention stays inside each sample. Keep it on the host: the segments are planned from
        its values once per forward (on a device tensor that read is a host sync).
        """
        packed_seq_params = None
        if cu_seqlens is not None:
            if self.use_te:
                raise ValueError(
                    "--pack-sequences is not supported with transformer-engine layers yet; "
                    "build the model with local layers (ParallelOptions(use_transformer_engine=False))"
                )
            # Local (SDPA) attention runs each sample's segment of the [b, s] rows on its own (sbhd
            # segments, no [s, s] mask). RoPE needs no restart per sample: its scores depend only on
            # relative offsets.
            batch_size, seq_len, device = self._rows(input_ids)
            packed_seq_params = row_segments(cu_seqlens, batch_size, seq_len, device=device)
            attention_mask = None
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, position_ids, pixel_values, pixel_attention_mask, image_mask,
                                       image_counts)
        return self.language_model(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )

    def _rows(self, input_ids: Optional[torch.Tensor]) -> tuple:
        """(b, s, device) of the micro-batch: from input_ids, or on a later stage from the hidden states it
        received ([s, b, h], the sequence split over TP ranks with sequence parallelism)."""
        if input_ids is not None:
            return input_ids.shape[0], input_ids.shape[1], input_ids.device
        hidden = self.language_model.decoder.input_tensor
        if hidden is None:
            raise ValueError("packed rows (cu_seqlens) need input_ids on a stage without pipeline input")
        config = self.configs.language
        split = config.tensor_model_parallel_size if config.sequence_parallel else 1
        return hidden.shape[1], hidden.shape[0] * split, hidden.device


def build_model(hf_config, opts: ParallelOptions, init_weights: bool = True, device=None) -> Idefics2Model:
    """The model part this rank holds (needs megatron-core's parallel state to be initialised).

    `init_weights=False` when every weight is loaded right after (a checkpoint, HF weights): nothing is
    drawn at random, parameters hold uninitialised memory until the load fills them.
    On CUDA (unless `opts.use_cpu_initialization`) parameters are created on the current GPU:
    megatron-core's layers place their own there, and the default-device context puts our torch
    modules (patch embedding, position table, norms, perceiver latents) on it too.
    `device="meta"` (with `opts.use_cpu_initialization` and `init_weights=False`, as
    `meta_build.build_rank_on_meta` passes them): shapes only, no memory (the layout planner).
    """
    configs = build_configs(hf_config, opts, init_weights)
    if device is None:
        device = "cpu" if configs.language.use_cpu_initialization else torch.device("cuda", torch.cuda.current_device())
    with torch.device(device):
        model = Idefics2Model(
            configs,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            use_te=opts.uses_transformer_engine(),
        )
    if not init_weights:
        mark_tensor_parallel_weights(model)
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Set megatron-core's TP attributes on the split weights of local layers built without init.

    megatron-core sets `tensor_model_parallel` / `partition_dim` only inside its init functions, which
    `perform_initialization=False` skips. Unmarked, a split weight counts as a TP duplicate: the grad
    norm and clipping would take it from TP rank 0 alone.
    """
    # A gated MLP's fc1 holds [gate; up] interleaved per TP rank: megatron-core gives it stride 2.
    gated_fc1 = {id(m.linear_fc1) for m in model.modules() if isinstance(m, MLP) and m.config.gated_linear_unit}
    split_dims = ((tensor_parallel.ColumnParallelLinear, 0), (tensor_parallel.VocabParallelEmbedding, 0),
                  (tensor_parallel.RowParallelLinear, 1))
    for module in model.modules():
        for kind, dim in split_dims:
            weight = getattr(module, "weight", None)
            if (isinstance(module, kind) and weight is not None and not getattr(weight, "tensor_model_parallel", False)
                    and not hasattr(weight, COPIES_ATTR)):  # replicated KV copies are marked already
                stride = 2 if id(module) in gated_fc1 else 1
                tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, stride)
