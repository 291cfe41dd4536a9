"""Activation memory of one micro-batch per pipeline stage: what the backward pass keeps alive.

Derived the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", sec. 4) derive their 34·sbh + 5·as²b per GPT layer: count the tensors each op saves for its
backward, adapted to this model's layers. Elements, times the activation dtype's bytes; b micro-batch
size, s sequence length, T = b·s tokens, t TP size, sp = t with --sequence-parallel (else 1), per layer:

  language layer  T·[4h/sp + (2q + 3k)/t + q/t + 3f/t]
      4h/sp: the two norms' inputs and outputs (the outputs are the QKV / fc1 inputs); (q + 2k)/t the
      fused QKV output (v is a view of it, so SDPA keeps it all) plus (q + k)/t the RoPE'd q and k; q/t
      the attention output (linear_proj's input); 3f/t SwiGLU's fc1 output (gate, up) and its output
      (fc2's input). q = heads·head_dim, k = KV heads·head_dim, f = FFN width. No s² term: SDPA
      (flash / memory-efficient kernels) keeps its output and log-sum-exp only; no dropout masks
      (Idefics2 has no hidden dropout; attention dropout 0).
  vision layer    N·P·[4hv + 4hv/t + 2I/t]   (N images of P patches: norms 4hv, QKV 3hv/t and its
      attention output hv/t, GELU's input and output 2I/t; SigLIP has no RoPE and no sequence parallel)
  vision tower    + N·P·2hv (post-LayerNorm input, and the real patches gathered for the connector)
  connector       N·P·[3F/t + h] (modality projection: SwiGLU over F = text FFN width, its output is
                  the perceiver context) + per perceiver layer N·[P·h + (P + n)·(h + 4kp/t)]
                  (context norm output; the [context; latents] concat, its KV projection and the
                  per-image gather of it) + N·n·(4h + 2qp/t + 12h/t) (latent side: n latents, MLP 4h)
  head            (last stage) T·2h/sp (final norm in/out) and the loss working set T·V/t·(2a + 4)/a:
                  logits, their padded-vocab-masked copy (a bytes each) and the fp32 softmax the
                  cross-entropy keeps, where a = activation bytes.

Recompute (megatron-core, applied to the vision tower and the language model, which are megatron-core
TransformerBlocks; the connector is not recomputed):
  full      (--recompute-granularity full, uniform, 1 layer per unit): a layer keeps only its input
            (T·h/sp; N·P·hv in the ViT), and the backward re-materialises one layer at a time: + the
            largest single layer's set above.
  selective (megatron-core's default `core_attn`): recomputes the core attention, which with SDPA
            kept only its output and log-sum-exp: the estimate is the no-recompute one.

Frozen towers (`--freeze-*`): a frozen vision tower keeps nothing (no parameter before it trains; only
the real patches handed to the connector, N·P·hv, if the connector trains); with the connector frozen
too, the connector keeps nothing either. A frozen language model still keeps its activations when the
connector or the tower trains: their gradient flows back through it.

1F1B pipeline schedule: stage i holds the activations of min(PP - i, micro-batches) micro-batches at
its peak (Korthikanti et al., sec. 4.2.3); the planner assumes at least PP micro-batches per step.
Not counted: the input batch itself (ids, pixels), per-op transients other than the head's, allocator
fragmentation. `estimate` reports the pieces so the table can show where memory goes.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.models.idefics2.config import ParallelOptions, layers_per_stage, padded_vocab_size


@dataclass(frozen=True)
class Workload:
    """One micro-batch: `micro_batch_size` rows of `seq_length` tokens, `images_per_sample` images per
    row at `image_size` pixels a side (None: the vision config's own, i.e. full-resolution images)."""

    micro_batch_size: int
    seq_length: int
    images_per_sample: int = 1
    image_size: int | None = None


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes per stage: `stored` per micro-batch, kept `in_flight` times, plus `working` once."""

    stored: dict
    working: int
    in_flight: int

    @property
    def total(self) -> int:
        return self.in_flight * sum(self.stored.values()) + self.working


def _text_layer(t_cfg, tokens: int, tp: int, sp: int) -> tuple[int, int]:
    """(no-recompute elements, layer-input elements) of one language layer."""
    h, f = t_cfg.hidden_size, t_cfg.intermediate_size
    d = getattr(t_cfg, "head_dim", None) or h // t_cfg.num_attention_heads
    q, k = t_cfg.num_attention_heads * d, t_cfg.num_key_value_heads * d
    return tokens * (4 * h // sp + (2 * q + 3 * k) // tp + q // tp + 3 * f // tp), tokens * h // sp


def _vision_layer(v_cfg, patches: int, tp: int) -> tuple[int, int]:
    hv, i = v_cfg.hidden_size, v_cfg.intermediate_size
    return patches * (4 * hv + 4 * hv // tp + 2 * i // tp), patches * hv


def _connector(hf_config, images: int, patches_per_image: int, tp: int) -> int:
    p_cfg, t_cfg = hf_config.perceiver_config, hf_config.text_config
    h, n = t_cfg.hidden_size, p_cfg.resampler_n_latents
    kp = p_cfg.num_key_value_heads * p_cfg.resampler_head_dim
    qp = p_cfg.resampler_n_heads * p_cfg.resampler_head_dim
    patches = images * patches_per_image
    projection = patches * (3 * t_cfg.intermediate_size // tp + h)
    per_layer = patches * h + images * (patches_per_image + n) * (h + 4 * kp // tp) + images * n * (4 * h + 2 * qp // tp + 12 * h // tp)
    return projection + p_cfg.resampler_depth * per_layer


def estimate(hf_config, opts: ParallelOptions, stage: int, work: Workload, bytes_per_element: int,
             frozen=()) -> ActivationEstimate:
    """Activation bytes of pipeline stage `stage` under layout `opts` with the `frozen` components
    ("vision", "connector", "llm"; see the module docstring)."""
    tp, pp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size
    sp = tp if opts.sequence_parallel and tp > 1 else 1
    recompute = opts.recompute_granularity
    a = bytes_per_element
    tokens = work.micro_batch_size * work.seq_length
    t_cfg, v_cfg = hf_config.text_config, hf_config.vision_config
    layers = layers_per_stage(t_cfg.num_hidden_layers, pp, opts.decoder_first_pipeline_num_layers)[stage]
    layer_full, layer_input = _text_layer(t_cfg, tokens, tp, sp)
    stored, working = {}, 0
    full = recompute == "full"
    stored["language"] = layers * (layer_input if full else layer_full) * a
    largest = layer_full if full else 0
    if stage == 0:
        side = (work.image_size or v_cfg.image_size) // v_cfg.patch_size
        images, per_image = work.micro_batch_size * work.images_per_sample, side * side
        vis_full, vis_input = _vision_layer(v_cfg, images * per_image, tp)
        patches_out = images * per_image * v_cfg.hidden_size
        connector_trains = "connector" not in frozen
        if "vision" in frozen:
            stored["vision"] = (patches_out if connector_trains else 0) * a
        else:
            stored["vision"] = (v_cfg.num_hidden_layers * (vis_input if full else vis_full) + 2 * patches_out) * a
            largest = max(largest, vis_full if full else 0)
        trains_before = connector_trains or "vision" not in frozen
        stored["connector"] = _connector(hf_config, images, per_image, tp) * a if trains_before else 0
    if stage == pp - 1:
        vocab = padded_vocab_size(t_cfg.vocab_size, tp) // tp
        stored["head"] = tokens * 2 * t_cfg.hidden_size // sp * a
        working += tokens * vocab * (2 * a + 4)
    working += largest * a
    return ActivationEstimate(stored, working, in_flight=pp - stage)
