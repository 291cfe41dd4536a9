"""Perceiver cross-attention without flash-attn: padded per-image SDPA vs one block-diagonal mask.

The perceiver's latents (64 per image) attend to their own image's real patches plus the latents.
`varlen_attention`'s torch path scatters each image into a padded batch and masks padded keys. The
alternative it replaced ran one SDPA over all packed tokens with a block-diagonal mask, so its
scores grow with (images x latents) x (all keys of all images). Both are timed here on the same
inputs (Idefics2-8b perceiver shapes: 16 query heads, 4 kv heads, head dim 96) and checked equal.

    python -m bench.bench_perceiver_attention            # writes bench/results/perceiver_attention.json
    python -m bench.bench_perceiver_attention --images 4 8 --repeats 2 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_patch.models.idefics2.varlen_attention import segment_ids, varlen_attention

HEADS, KV_HEADS, HEAD_DIM, LATENTS = 16, 4, 96, 64


def block_mask_attention(q, k, v, cu_q, cu_k, scale):
    """The replaced path: one SDPA over everything, block-diagonal mask."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    same = segment_ids(cu_q, q.shape[0])[:, None] == segment_ids(cu_k, k.shape[0])[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=same, scale=scale)
    return out.transpose(0, 1)


def inputs(num_images: int, seed: int = 0):
    """Images of 300..729 real patches (378 px SigLIP grid is 27 x 27), each followed by its latents."""
    g = torch.Generator().manual_seed(seed)
    keys = [int(torch.randint(300, 730, (1,), generator=g)) + LATENTS for _ in range(num_images)]
    cu_q = torch.arange(0, (num_images + 1) * LATENTS, LATENTS, dtype=torch.int32)
    cu_k = F.pad(torch.tensor(keys).cumsum(0), (1, 0)).to(torch.int32)
    q = torch.randn(num_images * LATENTS, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(sum(keys), KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(sum(keys), KV_HEADS, HEAD_DIM, generator=g)
    return q, k, v, cu_q, cu_k, max(keys)


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perceiver_attention.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = HEAD_DIM**-0.5
    rows = []
    with torch.no_grad():
        for n in args.images:
            q, k, v, cu_q, cu_k, max_k = inputs(n)
            padded = lambda: varlen_attention(q, k, v, cu_q, cu_k, LATENTS, max_k, scale)  # noqa: E731
            block = lambda: block_mask_attention(q, k, v, cu_q, cu_k, scale)  # noqa: E731
            diff = float((padded() - block()).abs().max())
            row = {
                "images": n,
                "total_keys": int(cu_k[-1]),
                "padded_ms": round(1000 * best_seconds(padded, args.repeats), 2),
                "block_mask_ms": round(1000 * best_seconds(block, args.repeats), 2),
                # fp32 scores SDPA's math path materialises: [heads, queries, keys]
                "padded_scores_mib": round(4 * HEADS * n * LATENTS * max_k / 2**20, 1),
                "block_mask_scores_mib": round(4 * HEADS * n * LATENTS * int(cu_k[-1]) / 2**20, 1),
                "max_abs_diff": diff,
            }
            row["speedup"] = round(row["block_mask_ms"] / row["padded_ms"], 2)
            rows.append(row)
            print(json.dumps(row))
    result = {"benchmark": "perceiver_attention", "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "latents": LATENTS, "threads": args.threads, "machine": f"{platform.machine()}, CPU",
              "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
