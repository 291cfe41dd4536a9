"""HF `Idefics2Config` -> megatron-core `TransformerConfig`s, and the parallel-layout checks.

One Idefics2 model is four megatron-core configs: the SigLIP vision tower, the modality projection,
the perceiver resampler and the language model. All four share the parallel settings; only the
language model is split over pipeline stages (vision and connector live on the first stage).

`validate_layout` runs before anything is built and fails with one line saying what to change; it
also refuses HF config settings the model does not implement (biases in the text model's linears, a
tied-head flag that disagrees with itself). Whether the head is tied is decided by
`tied_word_embeddings` alone; the text model's RoPE by `rope_settings` alone; its sliding window
(Mistral's `sliding_window`) by `sliding_window` alone. Each tower's `attention_dropout` and
`initializer_range` reach its megatron-core config (`_training_settings`).

Where parameters are created and whether they are randomly initialised is decided here too
(`_base_kwargs`): on a CUDA machine megatron-core creates them directly on the GPU, and a caller that
loads weights right after building asks for no initialisation at all (`init_weights=False`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
}


@dataclass(frozen=True)
class ParallelOptions:
    """How the model is laid out and run; mirrors Megatron-LM's flags of the same names."""

    tensor_model_parallel_size: int = 1
    """--tensor-model-parallel-size: ranks that split each layer's matrices."""
    pipeline_model_parallel_size: int = 1
    """--pipeline-model-parallel-size: stages the language-model layers are split over."""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """--decoder-first-pipeline-num-layers: LLM layers on stage 0 (it also holds vision + connector)."""
    sequence_parallel: bool = False
    """--sequence-parallel: split LLM activations along the sequence in TP regions (the sequence
    length must then be a multiple of the TP size)."""
    recompute_granularity: Optional[str] = None
    """--recompute-granularity: 'full' or 'selective' activation recompute, passed to megatron-core."""
    recompute_method: Optional[str] = None
    """--recompute-method: 'uniform' or 'block' (with full recompute)."""
    recompute_num_layers: Optional[int] = None
    """--recompute-num-layers: layers per recompute unit (with full recompute)."""
    params_dtype: torch.dtype = torch.float32
    """Parameter dtype: torch.float32 or torch.bfloat16 (--bf16)."""
    use_transformer_engine: bool = False
    """--transformer-impl transformer_engine: build layers from transformer-engine specs (it must be
    importable); the default is the local torch layers (SDPA attention), never chosen silently."""
    use_cpu_initialization: Optional[bool] = None
    """--use-cpu-initialization: create (and initialise) parameters on the CPU, then move them. None:
    only when CUDA is absent; on a GPU parameters are created on the device (no per-rank host copy of
    the model, no host->device copies). CPU initialisation draws the full matrix and slices it, so the
    random init is the same at every TP size (but for the perceiver's KV heads at TP above their count,
    where every copy takes its first copy's values); the GPU path draws each shard from the TP-rank RNG."""
    bias_fusions: Optional[bool] = None
    """megatron-core's torch.compile'd bias+activation (SwiGLU, tanh-GELU) and bias+dropout+add fusions
    (`bias_activation_fusion`, `bias_dropout_fusion`); they need no extra package and keep the numbers.
    None: on when CUDA is present (on CPU torch.compile would need a C++ compiler and gains little)."""
    gradient_accumulation_fusion: Optional[bool] = None
    """megatron-core's `gradient_accumulation_fusion`: weight gradients accumulated straight into DDP's
    fp32 `main_grad` by apex's `fused_weight_gradient_mlp_cuda` kernels (TE layers fuse it themselves,
    but the output layer and the perceiver are megatron-core's local linear layers, which need apex's
    extension in any case). None: on when CUDA is present and that extension is importable, else off;
    --no-gradient-accumulation-fusion: off."""

    def uses_transformer_engine(self) -> bool:
        return bool(self.use_transformer_engine)


@dataclass(frozen=True)
class RopeSettings:
    """The text model's RoPE as megatron-core's GPTModel takes it."""

    theta: float
    """GPTModel rotary_base."""
    scaling: bool = False
    """GPTModel rope_scaling: Llama-3.1/3.2's frequency-dependent scaling (`RotaryEmbedding._apply_scaling`)."""
    scaling_factor: float = 8.0
    """GPTModel rope_scaling_factor (used only with `scaling`)."""


@dataclass(frozen=True)
class Idefics2Configs:
    vision: TransformerConfig
    projection: TransformerConfig
    perceiver: TransformerConfig
    language: TransformerConfig
    vocab_size: int
    """True vocabulary size of the HF checkpoint."""
    padded_vocab_size: int
    """Vocabulary padded to a multiple of the TP size; the extra logits are masked out."""
    image_token_id: int
    image_seq_len: int
    """Perceiver latents per image: the number of <image> tokens each image fills."""
    patch_size: int
    image_size: int
    rope: RopeSettings
    """The language model's rotary embedding (`rope_settings`)."""
    tie_word_embeddings: bool


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of the TP size (each rank holds an equal slice)."""
    return -(-vocab_size // tp) * tp


def layers_per_stage(num_layers: int, pp: int, first_stage_layers: Optional[int] = None) -> list[int]:
    """LLM layers held by each pipeline stage (megatron-core's rule for an uneven first stage)."""
    if first_stage_layers is None:
        return [num_layers // pp] * pp
    rest = (num_layers - first_stage_layers) // (pp - 1) if pp > 1 else 0
    return [first_stage_layers] + [rest] * (pp - 1)


def tied_word_embeddings(hf_config) -> bool:
    """Whether the LM head shares the token embedding. The one place that decides it: the model, the
    weight mapping, loading and the converters all ask here.

    transformers' Idefics2 ties by the top-level `tie_word_embeddings`; `text_config` carries its own
    flag, and a config where the two differ is refused rather than guessed at.
    """
    top = bool(getattr(hf_config, "tie_word_embeddings", False))
    text = getattr(hf_config.text_config, "tie_word_embeddings", None)
    if text is not None and bool(text) != top:
        raise ValueError(
            f"config tie_word_embeddings={top} but text_config.tie_word_embeddings={bool(text)}; "
            f"set both to the same value (true when lm_head.weight is the token embedding)"
        )
    return top


def sliding_window(text_config) -> Optional[int]:
    """Keys each token attends to in the text model (itself and the ones before it), or None for full
    causal attention; ValueError (one line) for a value transformers would not accept.

    Mistral's `sliding_window` (4096 in transformers' default Mistral config, null in Mistral-7B v0.2
    and later) reaches the language config as megatron-core's `window_size = (W - 1, 0)`: the SDPA
    core attention and transformer-engine both apply it, so any --seq-length attends as in transformers.
    transformers' Llama has no window and ignores the field; a Llama config that sets it is refused
    rather than trained either way.
    """
    window = getattr(text_config, "sliding_window", None)
    if window is None:
        return None
    model_type = getattr(text_config, "model_type", None)
    if model_type != "mistral":
        raise ValueError(f"text_config.sliding_window is {window!r} in a {model_type!r} text config, whose "
                         f"transformers attention has no sliding window; set it to null")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"text_config.sliding_window {window!r} must be a positive integer or null")
    return window


def _check_text_features(text_config) -> None:
    """Refuse text-model features the megatron-core configs built here do not express."""
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text_config, flag, False):
            raise ValueError(
                f"text_config.{flag} is true, but biases in the language model's "
                f"{'attention' if flag == 'attention_bias' else 'MLP'} linears are not supported; "
                f"use a checkpoint without them"
            )


def validate_layout(hf_config, opts: ParallelOptions, world_size: Optional[int] = None) -> None:
    """Raise ValueError (one line, naming the flag) when `opts` cannot lay out this model."""
    tp, pp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) must be >= 1")
    if world_size is not None and world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size = {tp} x {pp}; change the layout or the number of processes"
        )
    v, p, t = hf_config.vision_config, hf_config.perceiver_config, hf_config.text_config
    checks = [
        ("vision num_attention_heads", v.num_attention_heads, ""),
        ("perceiver resampler_n_heads", p.resampler_n_heads, ""),
        ("text num_attention_heads", t.num_attention_heads, ""),
        # megatron-core's GQA splits the text model's KV heads; only the perceiver replicates them.
        ("text num_key_value_heads", t.num_key_value_heads, " (only the perceiver's KV heads are replicated)"),
    ]
    for name, value, note in checks:
        if value % tp != 0:
            raise ValueError(
                f"--tensor-model-parallel-size {tp} does not divide the {name} ({value}); "
                f"choose a TP size that divides it{note}"
            )
    kv = p.num_key_value_heads
    if kv % tp != 0 and tp % kv != 0:  # split when TP divides them, replicated (kv_replication.py) when above
        raise ValueError(
            f"--tensor-model-parallel-size {tp} and the perceiver num_key_value_heads ({kv}) must divide one "
            f"another; choose a TP size that divides {kv} or a multiple of it"
        )
    n = t.num_hidden_layers
    first = opts.decoder_first_pipeline_num_layers
    if first is not None:
        if pp < 2:
            raise ValueError("--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size >= 2")
        if not 0 < first < n:
            raise ValueError(
                f"--decoder-first-pipeline-num-layers {first} must be between 1 and {n - 1}: the model has "
                f"{n} LLM layers and every pipeline stage needs at least one"
            )
        if (n - first) % (pp - 1) != 0:
            raise ValueError(
                f"--decoder-first-pipeline-num-layers {first} leaves {n - first} of {n} LLM layers, which do not "
                f"split evenly over the other {pp - 1} pipeline stages"
            )
    elif n % pp != 0:
        raise ValueError(
            f"the {n} LLM layers do not split evenly over --pipeline-model-parallel-size {pp}; "
            f"choose a PP size that divides {n} or set --decoder-first-pipeline-num-layers"
        )
    if p.hidden_size != t.hidden_size:
        raise ValueError(
            f"perceiver_config.hidden_size ({p.hidden_size}) must equal text_config.hidden_size ({t.hidden_size})"
        )
    for name, cfg in (("vision_config", v), ("text_config", t)):
        act = getattr(cfg, "hidden_act", None)
        if act not in _ACTIVATIONS:
            raise ValueError(f"{name}.hidden_act {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    for name, cfg in (("vision_config", v), ("perceiver_config", p), ("text_config", t)):
        _training_settings(name, cfg)
    channels = getattr(v, "num_channels", 3)
    if channels != 3:
        raise ValueError(f"vision_config.num_channels {channels} is not supported: the image pipeline and the "
                         f"patch embedding take RGB (3 channels)")
    _check_text_features(t)
    rope_settings(t)
    sliding_window(t)
    tied_word_embeddings(hf_config)


# megatron-core 0.16.1's Llama-3 RoPE scaling takes only the factor from GPTModel; these three are
# fixed defaults of `RotaryEmbedding._apply_scaling`. Llama-3.1 and 3.2 use exactly these values.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_settings(text_config) -> RopeSettings:
    """The RoPE settings of an HF Llama / Mistral text config; ValueError (one line) for RoPE the model
    would compute differently from transformers.

    transformers 5 keeps RoPE in `text_config.rope_parameters` (`rope_type`, `rope_theta`, and for
    "llama3" `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`); a
    transformers-4 style `rope_scaling` dict (also with the old key `type`) is read the same way.
    """
    params = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"text_config partial_rotary_factor {partial} is not supported (RoPE over the whole head only)")
    if rope_type == "default":
        return RopeSettings(theta)
    if rope_type != "llama3":
        raise ValueError(
            f"text_config.rope_parameters rope_type {rope_type!r} is not supported (only 'default' and 'llama3' RoPE)"
        )
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"text_config.rope_parameters factor {factor!r} must be a positive number for rope_type 'llama3'")
    for key, fixed in _MCORE_LLAMA3_FIXED.items():
        value = params.get(key)
        if not isinstance(value, (int, float)) or float(value) != fixed:
            raise ValueError(
                f"text_config.rope_parameters {key} {value!r} is not supported: megatron-core's Llama-3 RoPE "
                f"scaling applies {key}={fixed:g} (the Llama-3.1/3.2 value)"
            )
    return RopeSettings(theta, scaling=True, scaling_factor=float(factor))


def bias_fusions_on(opts: ParallelOptions) -> bool:
    """Whether megatron-core's torch.compile'd bias fusions are used (`ParallelOptions.bias_fusions`)."""
    return torch.cuda.is_available() if opts.bias_fusions is None else opts.bias_fusions


def grad_accumulation_fusion_on(opts: ParallelOptions) -> bool:
    """`ParallelOptions.gradient_accumulation_fusion` resolved: never without apex's extension (megatron-core's
    local linear layers raise at build time without it), which needs CUDA."""
    from megatron_patch.platform.accelerators import accelerators

    available = torch.cuda.is_available() and accelerators()["fused_weight_gradient_mlp_cuda"]
    return available and opts.gradient_accumulation_fusion is not False


def describe_fusions(opts: ParallelOptions) -> str:
    """One line for the start-up report: which fusions the run uses, and why gradient-accumulation
    fusion is off when it is."""
    grad = "on" if grad_accumulation_fusion_on(opts) else (
        "off (--no-gradient-accumulation-fusion)" if opts.gradient_accumulation_fusion is False
        else "off (needs CUDA and apex's fused_weight_gradient_mlp_cuda)")
    return f"fusions: bias {'on' if bias_fusions_on(opts) else 'off'}, gradient accumulation {grad}"


def _cpu_initialization(opts: ParallelOptions) -> bool:
    cuda = torch.cuda.is_available()
    if opts.use_cpu_initialization is None:
        return not cuda
    if not opts.use_cpu_initialization and not cuda:
        raise ValueError("use_cpu_initialization=False needs CUDA, which this machine lacks; leave it unset")
    return opts.use_cpu_initialization


def _base_kwargs(opts: ParallelOptions, init_weights: bool) -> dict:
    """Settings every sub-config shares.

    Fusions: `bias_activation_fusion` and `bias_dropout_fusion` are megatron-core's own torch.compile'd
    functions (megatron/core/fusions/fused_bias_{swiglu,gelu,dropout}.py) and need no extra package; on
    by default on CUDA only (`ParallelOptions.bias_fusions`). Not verified on a GPU: the test
    (tests/models/test_idefics2_parity.py::test_bias_fusions_keep_loss_and_grads) runs the fused functions
    eagerly on CPU against the unfused path (formulas and hand-written backwards); their compiled form
    on CUDA (Triton, fp32 or bf16) has not been run. The others stay off: `masked_softmax_fusion` and
    `persist_layer_norm` need apex / TE kernels (and our attention is SDPA, our norms torch's),
    `apply_rope_fusion` needs TE's fused RoPE. `gradient_accumulation_fusion`: see
    `ParallelOptions.gradient_accumulation_fusion` (`grad_accumulation_fusion_on`).
    """
    bf16 = opts.params_dtype == torch.bfloat16
    fusions = bias_fusions_on(opts)
    return dict(
        tensor_model_parallel_size=opts.tensor_model_parallel_size,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=bf16,
        use_cpu_initialization=_cpu_initialization(opts),
        # Off: parameters stay torch.empty until the caller's weight load fills every one of them.
        perform_initialization=init_weights,
        gradient_accumulation_fusion=grad_accumulation_fusion_on(opts),
        bias_activation_fusion=fusions,
        bias_dropout_fusion=fusions,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,  # Idefics2 has no residual or embedding dropout, only attention dropout
        recompute_granularity=opts.recompute_granularity,
        recompute_method=opts.recompute_method,
        recompute_num_layers=opts.recompute_num_layers,
    )


def _training_settings(name: str, sub_config) -> dict:
    """An HF sub-config's attention dropout (applied in training only, as transformers does) and the
    std of a from-scratch random init (`initializer_range`, megatron-core's `init_method_std`);
    ValueError (one line) for values out of range."""
    dropout = float(getattr(sub_config, "attention_dropout", 0.0) or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}.attention_dropout {dropout!r} must be in [0, 1)")
    std = float(getattr(sub_config, "initializer_range", 0.02))
    if not std > 0.0:
        raise ValueError(f"{name}.initializer_range {std!r} must be positive")
    return dict(attention_dropout=dropout, init_method_std=std)


def _mlp_activation(act: str, gated: bool, fused: bool) -> dict:
    """activation_func (and whether megatron-core may fuse it) for an HF `hidden_act`.

    megatron-core fuses only F.silu when gated (SwiGLU, same formula) and F.gelu; its fused GELU is the
    tanh approximation whatever activation_func says (fused_bias_gelu.py). So a tanh-GELU MLP is handed
    over as F.gelu with the fusion on, and an exact ("gelu") one keeps the fusion off: fusing it would
    change the numbers. Every other case runs unfused.
    """
    func = _ACTIVATIONS[act]
    if fused and gated and func is F.silu:
        return dict(activation_func=func, bias_activation_fusion=True)
    if fused and not gated and act in ("gelu_pytorch_tanh", "gelu_new"):
        return dict(activation_func=F.gelu, bias_activation_fusion=True)
    return dict(activation_func=func, bias_activation_fusion=False)


def build_configs(hf_config, opts: ParallelOptions, init_weights: bool = True) -> Idefics2Configs:
    """Translate an HF Idefics2Config into the four megatron-core configs (after `validate_layout`).

    `init_weights=False`: megatron-core allocates parameters without drawing them (the caller loads
    every one next; `model_loading.load_hf_weights` checks that)."""
    validate_layout(hf_config, opts)
    v, p, t = hf_config.vision_config, hf_config.perceiver_config, hf_config.text_config
    rope = rope_settings(t)
    base = _base_kwargs(opts, init_weights)
    fused = base.pop("bias_activation_fusion")
    vision = TransformerConfig(
        num_layers=v.num_hidden_layers,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.layer_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        **_mlp_activation(v.hidden_act, gated=False, fused=fused),
        **_training_settings("vision_config", v),
        pipeline_model_parallel_size=1,  # the vision tower lives whole on the first stage
        **base,
    )
    perceiver = TransformerConfig(
        num_layers=p.resampler_depth,
        hidden_size=p.hidden_size,
        ffn_hidden_size=4 * p.hidden_size,
        num_attention_heads=p.resampler_n_heads,
        num_query_groups=p.num_key_value_heads,
        kv_channels=p.resampler_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=p.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        **_mlp_activation(getattr(p, "hidden_act", "silu"), gated=True, fused=fused),
        **_training_settings("perceiver_config", p),
        pipeline_model_parallel_size=1,
        **base,
    )
    projection = dataclasses.replace(
        perceiver, ffn_hidden_size=t.intermediate_size, **_mlp_activation(t.hidden_act, gated=True, fused=fused)
    )
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    pp = opts.pipeline_model_parallel_size
    window = sliding_window(t)
    language = TransformerConfig(
        num_layers=t.num_hidden_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.intermediate_size,
        num_attention_heads=t.num_attention_heads,
        num_query_groups=t.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        **_mlp_activation(t.hidden_act, gated=True, fused=fused),
        **_training_settings("text_config", t),
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=opts.decoder_first_pipeline_num_layers,
        sequence_parallel=opts.sequence_parallel and opts.tensor_model_parallel_size > 1,
        window_size=None if window is None else (window - 1, 0),
        **base,
    )
    tp = opts.tensor_model_parallel_size
    vocab = t.vocab_size
    return Idefics2Configs(
        vision=vision,
        projection=projection,
        perceiver=perceiver,
        language=language,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp),
        image_token_id=hf_config.image_token_id,
        image_seq_len=p.resampler_n_latents,
        patch_size=v.patch_size,
        image_size=v.image_size,
        rope=rope,
        tie_word_embeddings=tied_word_embeddings(hf_config),
    )
