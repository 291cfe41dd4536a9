"""Write a tiny random HF Idefics2 checkpoint (save_pretrained layout) for smoke runs and tests.

    python make_tiny_checkpoint.py --save-path runs/tiny/hf [--text mistral|llama] [--tie-word-embeddings] [--seed 0]
    python make_tiny_checkpoint.py --save-path runs/tiny/hf --tokenizer mistral   # trainable: real tokenizer

With `--tokenizer mistral` the folder also holds the real Mistral-7B tokenizer (from `mistral-common`,
plus Idefics2's image tokens and chat template) and an `Idefics2Processor` sized for the tiny vision
tower (images resized to at most `--image-size` pixels); the vocabulary and image token ids then
follow the tokenizer, so the data pipeline, training and `transformers` generation all use the folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def save_processor(folder: Path, image_size: int, image_seq_len: int) -> None:
    """Idefics2Processor (tokenizer already in `folder`) with images resized for a tiny vision tower."""
    from transformers import AutoTokenizer, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from megatron_patch.data.chat import IDEFICS2_CHAT_TEMPLATE

    image_processor = Idefics2ImageProcessorPil(
        size={"longest_edge": image_size, "shortest_edge": min(image_size, 28)}, do_image_splitting=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save-path", required=True)
    p.add_argument("--text", choices=["mistral", "llama"], default="mistral", help="text backbone style")
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", choices=["none", "mistral"], default="none",
                   help="mistral: save the real Mistral tokenizer and a processor; the vocabulary follows it")
    p.add_argument("--image-size", type=int, default=56, help="longest image edge of the processor (--tokenizer)")
    p.add_argument("--perceiver-kv-heads", type=int, default=None,
                   help="KV heads of the perceiver's 4 query heads (1 exercises KV heads replicated over TP)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer, Idefics2ForConditionalGeneration

    from megatron_patch.testing.tiny import randomize_weights, tiny_idefics2_config
    from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path

    save_path = Path(args.save_path)
    overrides = {}
    if args.tokenizer == "mistral":
        build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), save_path)
        tokenizer = AutoTokenizer.from_pretrained(save_path)
        overrides = dict(
            vocab_size=len(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            fake_image_token_id=tokenizer.convert_tokens_to_ids("<fake_token_around_image>"),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    config = tiny_idefics2_config(args.text, args.tie_word_embeddings, perceiver_kv_heads=args.perceiver_kv_heads,
                                  **overrides)
    torch.manual_seed(args.seed)
    model = Idefics2ForConditionalGeneration(config)
    randomize_weights(model, args.seed)
    model.save_pretrained(save_path)
    if args.tokenizer == "mistral":
        save_processor(save_path, args.image_size, config.perceiver_config.resampler_n_latents)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a {args.text}-style Idefics2 with {count:,} parameters to {save_path}")


if __name__ == "__main__":
    main()
