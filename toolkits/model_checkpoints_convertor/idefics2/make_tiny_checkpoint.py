"""Write a tiny random HF Idefics2 checkpoint (save_pretrained layout) for smoke runs and tests.

    python make_tiny_checkpoint.py --save-path runs/tiny/hf [--text mistral|llama] [--tie-word-embeddings] [--seed 0]
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save-path", required=True)
    p.add_argument("--text", choices=["mistral", "llama"], default="mistral", help="text backbone style")
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import Idefics2ForConditionalGeneration

    from megatron_patch.models.idefics2.tiny import randomize_weights, tiny_idefics2_config

    torch.manual_seed(args.seed)
    model = Idefics2ForConditionalGeneration(tiny_idefics2_config(args.text, args.tie_word_embeddings))
    randomize_weights(model, args.seed)
    model.save_pretrained(args.save_path)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a {args.text}-style Idefics2 with {count:,} parameters to {args.save_path}")


if __name__ == "__main__":
    main()
