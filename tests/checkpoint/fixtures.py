"""Tiny random checkpoints built offline: Idefics2 (HF), Llama-3 style LLM + tokenizer, SigLIP.

Also gives the converter scripts as modules (`toolkits.model_checkpoints_convertor.*`), and runs and
checks HF -> Megatron -> HF round trips.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_patch.models.idefics2.weight_mapping import hf_tensor_names
from megatron_patch.testing.tiny import randomize_weights, tiny_idefics2_config

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "toolkits" / "model_checkpoints_convertor"


def tool(relative: str):
    """A converter script as a module, e.g. tool('idefics2/hf2mcore.py').main([...])."""
    return importlib.import_module("toolkits.model_checkpoints_convertor." + relative.removesuffix(".py").replace("/", "."))


def idefics2_config(text: str, tied: bool = False, kv_heads: int | None = None):
    """tiny_idefics2_config, optionally with more key/value heads so TP=4 divides them."""
    config = tiny_idefics2_config(text, tie_word_embeddings=tied)
    if kv_heads is not None:
        config.text_config.num_key_value_heads = kv_heads
        config.perceiver_config.num_key_value_heads = kv_heads
    return config


def save_idefics2(folder: Path, config, seed: int = 0, processor: bool = False, max_shard_size=None):
    """A random tiny HF Idefics2 checkpoint in `folder`; returns the model (eval mode)."""
    from transformers import Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    randomize_weights(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if processor:
        save_processor(folder, config)
    return model


def byte_level_tokenizer(vocab_size: int = 120):
    """A Llama-3 style (byte-level BPE, <|begin_of_text|>) fast tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60]
    )
    corpus = ["a cat sits on the mat", "the image shows a dog", "describe the picture", "what is in the photo"] * 8
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])


def save_processor(folder: Path, config) -> None:
    """An Idefics2 processor (tiny tokenizer + image processor) saved next to a tiny checkpoint."""
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(), tokenizer=byte_level_tokenizer(),
        image_seq_len=config.perceiver_config.resampler_n_latents,
    )
    processor.save_pretrained(str(folder))


def save_llama(folder: Path, tied: bool = False, seed: int = 1):
    """A tiny LlamaForCausalLM (Llama-3 shapes: GQA, rope_theta 5e5) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, rope_theta=500000.0,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    randomize_weights(model, seed)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model


def save_siglip(folder: Path, full_model: bool = False, seed: int = 2):
    """A tiny SiglipVisionModel, or a whole SiglipModel (vision + text towers) when `full_model`."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)
    torch.manual_seed(seed)
    if full_model:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision)).eval()
    randomize_weights(model, seed)
    model.save_pretrained(str(folder))
    return model


def hf_tensors(folder):
    """Every tensor of an HF folder (single file or sharded), read independently of the tools."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def round_trip(src, tmp_path, tp, pp, first=None, extra=()):
    """hf2mcore into tmp_path/mg at tp x pp, mcore2hf back into tmp_path/back (small shards)."""
    mg, back = tmp_path / "mg", tmp_path / "back"
    args = ["--load-path", str(src), "--save-path", str(mg),
            "--target-tensor-model-parallel-size", str(tp), "--target-pipeline-model-parallel-size", str(pp), *extra]
    if first is not None:
        args += ["--target-decoder-first-pipeline-num-layers", str(first)]
    assert tool("idefics2/hf2mcore.py").main(args) == 0
    assert tool("idefics2/mcore2hf.py").main(["--load-path", str(mg), "--save-path", str(back), "--max-shard-size", "300KB"]) == 0
    return mg, back


def assert_bit_exact(src, back, config):
    """Every tensor the config implies came back with the same dtype and the same bits."""
    original, restored = hf_tensors(src), hf_tensors(back)
    assert sorted(restored) == sorted(hf_tensor_names(config))
    for name, tensor in restored.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name
