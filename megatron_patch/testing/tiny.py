"""Tiny random Idefics2 configs (Mistral- or Llama-3-style text) for tests, examples and benchmarks.

Sizes are chosen to exercise the awkward cases: grouped-query attention in the LLM and the perceiver,
a vocabulary that is not a multiple of the TP size, head dims that differ from hidden/heads.
"""
from __future__ import annotations

from transformers import Idefics2Config

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)
_TEXT = {
    "mistral": dict(
        model_type="mistral", hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, vocab_size=101, sliding_window=None, rope_theta=10000.0,
    ),
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, vocab_size=103, rope_theta=500000.0, attention_bias=False, mlp_bias=False,
    ),
}


def tiny_idefics2_config(text: str = "mistral", tie_word_embeddings: bool = False, vocab_size: int | None = None,
                         perceiver_kv_heads: int | None = None, **overrides) -> Idefics2Config:
    """A 2-4 layer Idefics2 config; `text` is 'mistral' or 'llama'; `vocab_size` to fit a real tokenizer;
    `perceiver_kv_heads` (of its 4 query heads) below the TP size exercises replicated KV heads."""
    # The text model's own flag agrees with the top-level one (config.tied_word_embeddings refuses a mismatch).
    text_config = dict(_TEXT[text], tie_word_embeddings=tie_word_embeddings)
    if vocab_size is not None:
        text_config["vocab_size"] = vocab_size
    vocab = text_config["vocab_size"]
    perceiver = dict(
        hidden_size=text_config["hidden_size"], resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
        resampler_head_dim=8, num_key_value_heads=perceiver_kv_heads or (2 if text == "mistral" else 4),
    )
    ids = dict(image_token_id=vocab - 2, fake_image_token_id=vocab - 3)
    return Idefics2Config(
        vision_config=_VISION,
        perceiver_config=perceiver,
        text_config=text_config,
        tie_word_embeddings=tie_word_embeddings,
        **{**ids, **overrides},
    )


def randomize_weights(model, seed: int = 0, scale: float = 0.08) -> None:
    """Give every tensor distinct, non-trivial values (norm gains around 1, nonzero biases).

    HF's default init leaves norms at exactly 1 and biases at 0, which would hide a swapped norm or
    bias in a parity check; this makes every tensor matter.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=g, dtype=torch.float32) * scale
            base = 1.0 if "norm" in name and param.dim() == 1 and "bias" not in name else 0.0
            param.copy_((base + noise).to(param.dtype))
