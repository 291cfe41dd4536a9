"""Compose an Idefics2 checkpoint from a Llama-3 style LLM and a SigLIP vision encoder.

    python toolkits/model_checkpoints_convertor/idefics2_llama3/compose.py \\
        --llm-path /models/Meta-Llama-3-8B-Instruct --vision-path /models/siglip-so400m-patch14-384 \\
        --save-path /models/idefics2-llama3-8b-init \\
        [--perceiver-latents 64 --perceiver-depth 3 --perceiver-heads 16 --perceiver-head-dim 128 \\
         --perceiver-kv-heads 4] [--seed 42] [--init-std 0.02] [--dtype auto] [--overwrite]

The result is an HF Idefics2 checkpoint (config, sharded safetensors, tokenizer + processor) that
`hf2mcore.py` converts like any other:
- text model: the LLM's tensors unchanged (`model.*` -> `model.text_model.*`, `lm_head.weight`); the
  tokenizer gains `<fake_token_around_image>`, `<image>`, `<end_of_utterance>` (and `--pad-token`
  when it has no pad token); embedding and head rows for new ids are the mean of the existing rows.
- vision model: the SigLIP vision tower unchanged (a `SiglipVisionModel` folder, or the vision half
  of a `SiglipModel`); its pooling head and SigLIP's text tower are dropped.
- connector (modality projection + perceiver resampler): freshly initialised from `--seed`:
  every linear weight ~ N(0, init_std) with init_std = --init-std or the LLM's initializer_range;
  RMSNorm gains = 1; perceiver latents ~ N(0, 1) (distinct latents; all-equal latents would start
  every query identical). Drawn in float32 from one generator in mapping order, then cast.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

from megatron_patch.checkpoint.config_files import read_config_dict
from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import fresh_staging, staging_path
from megatron_patch.checkpoint.verify import hf_tensor_shapes
from megatron_patch.conversion.hf_files import HFShardWriter, HFWeightsReader
from megatron_patch.conversion.publish import publish
from megatron_patch.conversion.read_once import require_used_once
from megatron_patch.conversion.tooling import Summary, parse_size, progress, run_tool
from megatron_patch.models.idefics2.config import tied_word_embeddings
from megatron_patch.models.idefics2.weight_mapping import (
    HF_CONNECTOR_PREFIX,
    HF_EMBED_TOKENS,
    HF_LM_HEAD,
    HF_TEXT_PREFIX,
    HF_VISION_PREFIX,
)

PROG = "compose"
FAKE_IMAGE, IMAGE, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"
TEXT_TYPES = ("llama", "mistral")
LLM_PREFIX, SIGLIP_VISION_PREFIX, SIGLIP_HEAD_PREFIX = "model.", "vision_model.", "head."  # source names
# Idefics2's conversation format: "User:<image>Describe it.<end_of_utterance>\nAssistant: ..."
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-path", required=True, help="HF Llama-3 style causal LM folder (with tokenizer)")
    parser.add_argument("--vision-path", required=True, help="HF SiglipVisionModel or SiglipModel folder")
    parser.add_argument("--save-path", required=True, help="HF Idefics2 output folder")
    parser.add_argument("--perceiver-latents", type=int, default=64, help="latents per image (= <image> tokens per image)")
    parser.add_argument("--perceiver-depth", type=int, default=3)
    parser.add_argument("--perceiver-heads", type=int, default=16)
    parser.add_argument("--perceiver-head-dim", type=int, default=128)
    parser.add_argument("--perceiver-kv-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42, help="seed of the connector initialisation")
    parser.add_argument("--init-std", type=float, default=None, help="connector linear init std (default: LLM initializer_range)")
    parser.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto", help="auto: the LLM embedding's dtype")
    parser.add_argument("--pad-token", default="<pad>", help="added as pad token when the tokenizer has none")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a different checkpoint at --save-path")
    return parser.parse_args(argv)


def _checked_config(folder: Path, flag: str, allowed: tuple):
    from transformers import AutoConfig

    model_type = read_config_dict(folder).get("model_type")
    if model_type not in allowed:
        raise CheckpointError(f"{flag} {folder}: config.json is a {model_type!r} model; expected one of {', '.join(allowed)}")
    return AutoConfig.from_pretrained(str(folder))


def text_target(name: str, tied: bool):
    """HF Idefics2 name for an LLM tensor, or None when it is dropped (rotary buffers, a tied head)."""
    if name.endswith("rotary_emb.inv_freq") or (tied and name == HF_LM_HEAD):
        return None
    if name == HF_LM_HEAD:
        return name
    return HF_TEXT_PREFIX + (name[len(LLM_PREFIX):] if name.startswith(LLM_PREFIX) else name)


def vision_target(name: str, vision_only: bool):
    """HF Idefics2 name for a SigLIP tensor, or None when dropped (pooling head, SigLIP text tower)."""
    if name.startswith(SIGLIP_VISION_PREFIX):
        rest = name[len(SIGLIP_VISION_PREFIX):]
    elif vision_only:
        rest = name  # transformers 5 saves SiglipVisionModel without the prefix
    else:
        return None  # text_model.*, logit_scale, logit_bias of a SiglipModel
    if rest.startswith(SIGLIP_HEAD_PREFIX):
        return None
    return HF_VISION_PREFIX + rest


def build_processor(llm_path: Path, vision_path: Path, latents: int, pad_token: str):
    """Idefics2 processor: the LLM tokenizer plus image tokens, SigLIP's normalisation."""
    from transformers import AutoTokenizer, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    if not any((llm_path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"--llm-path {llm_path} has no tokenizer files (tokenizer.json / tokenizer.model)")
    tokenizer = AutoTokenizer.from_pretrained(str(llm_path))
    norm = {}
    if (vision_path / "preprocessor_config.json").is_file():
        pre = read_config_dict(vision_path, "preprocessor_config.json")
        norm = {k: pre[k] for k in ("image_mean", "image_std") if k in pre}
    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(**norm), tokenizer=tokenizer, image_seq_len=latents,
        chat_template=CHAT_TEMPLATE,
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    return processor


def build_config(llm_config, vision_config, tokenizer, args):
    from transformers import Idefics2Config

    tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    text = llm_config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version"):
        text.pop(key, None)
    text["vocab_size"] = max(llm_config.vocab_size, len(tokenizer))
    vision = {k: getattr(vision_config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
        "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
    )}
    perceiver = dict(
        hidden_size=llm_config.hidden_size, rms_norm_eps=llm_config.rms_norm_eps, hidden_act="silu",
        resampler_n_latents=args.perceiver_latents, resampler_depth=args.perceiver_depth,
        resampler_n_heads=args.perceiver_heads, resampler_head_dim=args.perceiver_head_dim,
        num_key_value_heads=args.perceiver_kv_heads,
    )
    if args.perceiver_heads % args.perceiver_kv_heads:
        raise CheckpointError(f"--perceiver-kv-heads {args.perceiver_kv_heads} does not divide --perceiver-heads {args.perceiver_heads}")
    return Idefics2Config(
        vision_config=vision, perceiver_config=perceiver, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        fake_image_token_id=tokenizer.convert_tokens_to_ids(FAKE_IMAGE),
        tie_word_embeddings=tied,
    )


def init_connector_tensor(name: str, shape: tuple, std: float, generator: torch.Generator) -> torch.Tensor:
    """The documented connector init (module docstring): latents N(0,1), norms 1, linears N(0, std)."""
    if name.endswith("perceiver_resampler.latents"):
        return torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return torch.ones(shape)  # RMSNorm gains (the connector has no biases)
    return torch.randn(shape, generator=generator) * std


def resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing rows (new token ids start at the average)."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.double().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, -1)])


def compose(args: argparse.Namespace) -> str:
    summary = Summary(PROG)
    llm_path, vision_path, save = Path(args.llm_path), Path(args.vision_path), Path(args.save_path)
    for flag, folder in (("--llm-path", llm_path), ("--vision-path", vision_path)):
        if not folder.is_dir():
            raise CheckpointError(f"{flag} {folder} is not a folder")
    if save.exists() and (not save.is_dir() or (any(save.iterdir()) and not (save / "config.json").is_file())):
        raise CheckpointError(f"--save-path {save} exists and holds no HF checkpoint; choose a new folder")
    llm_config = _checked_config(llm_path, "--llm-path", TEXT_TYPES)
    siglip = _checked_config(vision_path, "--vision-path", ("siglip", "siglip_vision_model"))
    vision_only = siglip.model_type == "siglip_vision_model"
    vision_config = siglip if vision_only else siglip.vision_config
    llm, vision = HFWeightsReader(llm_path), HFWeightsReader(vision_path)
    processor = build_processor(llm_path, vision_path, args.perceiver_latents, args.pad_token)
    config = build_config(llm_config, vision_config, processor.tokenizer, args)
    tied, vocab = tied_word_embeddings(config), config.text_config.vocab_size
    embed = next((n for n in llm.names() if n.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise CheckpointError(f"--llm-path {llm_path} has no embed_tokens.weight tensor")
    dtype = llm.dtype(embed) if args.dtype == "auto" else _DTYPES[args.dtype]
    config.dtype = dtype
    shapes = hf_tensor_shapes(config)

    sources, dropped = {}, []  # target name -> (reader, source name)
    for reader, rule in ((llm, lambda n: text_target(n, tied)), (vision, lambda n: vision_target(n, vision_only))):
        for name in reader.names():
            target = rule(name)
            if target is None:
                dropped.append(name)
            elif target not in shapes:
                raise CheckpointError(f"source tensor {name} of {reader.hf_dir} maps to {target}, which Idefics2 does not have")
            elif target in sources:
                raise CheckpointError(f"source tensors {sources[target][1]} and {name} both map to {target}")
            else:
                sources[target] = (reader, name)
    missing = [n for n in shapes if n not in sources and not n.startswith(HF_CONNECTOR_PREFIX)]
    if missing:
        raise CheckpointError(f"no source tensor for {missing[0]} ({len(missing)} missing; check --llm-path / --vision-path)")

    save.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging(save)
    try:
        plan = {name: (dtype, shape) for name, shape in shapes.items()}
        writer = HFShardWriter(staging, plan, parse_size(args.max_shard_size))
        generator = torch.Generator().manual_seed(args.seed)
        std = args.init_std if args.init_std is not None else getattr(llm_config, "initializer_range", 0.02)
        uses = Counter()
        for name, shape in progress(shapes.items(), total=len(shapes), desc=PROG):
            if name in sources:
                reader, source = sources[name]
                tensor = reader.get(source)
                uses[(reader.hf_dir, source)] += 1
                summary.read(tensor)
                if name in (HF_EMBED_TOKENS, HF_LM_HEAD):
                    tensor = resize_rows(tensor, vocab)
            else:
                tensor = init_connector_tensor(name, shape, std, generator)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, the composed config implies {shape}")
            writer.add(name, tensor.to(dtype))
            summary.written_tensors += 1
            summary.written_bytes += tensor.numel() * dtype.itemsize
        read_once = [(reader.hf_dir, name) for reader, name in sources.values()]
        require_used_once(uses, read_once, lambda key: f"source tensor {key[1]} of {key[0]}")
        writer.close()  # after the source check: a skipped source is named as such, not as its target
        config.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        if (llm_path / "generation_config.json").is_file():
            shutil.copy2(llm_path / "generation_config.json", staging / "generation_config.json")
        status = publish(staging, save, args.overwrite, "HF checkpoint")
    finally:
        if staging_path(save).exists():
            shutil.rmtree(staging_path(save))
    note = f"; dropped {len(dropped)} unused source tensors (SigLIP head/text tower, buffers)" if dropped else ""
    return summary.line(save, status) + note


def main(argv=None) -> int:
    return run_tool(PROG, lambda: compose(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
