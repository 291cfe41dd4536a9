"""Packed-row attention (SDPAttention, forward + backward) for skewed packs: every segment padded to the
longest in one SDPA call (the plan before grouping) against segments grouped by length (what the model runs).

One row of 4,096 tokens, 8 query heads over 2 key/value heads, head dim 64, fp32, causal inside each
segment. Packs: "skewed" one 3,072-token sample + 32 samples of 32 tokens; "two" 3,072 + 1,024; "even"
4 x 1,024. Rounds alternate the plans and packs so machine noise hits them alike; medians are reported,
and `skewed_over_two` (the cost of the skewed pack over the 3,072 + 1,024 one) for each plan.

    python -m bench.bench_packed_attention                 # writes bench/results/packed_attention.json
    python -m bench.bench_packed_attention --rounds 3 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SEQ, HEADS, KV_HEADS, HEAD_DIM = 4096, 8, 2, 64
PACKS = {"skewed": [3072] + [32] * 32, "two": [3072, 1024], "even": [1024] * 4}
PLANS = {"one_group": False, "by_length": True}  # row_segments(by_length=...)


def _module():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.models.idefics2.sdpa_attention import SDPAttention
    from megatron_patch.platform import init_distributed

    init_distributed(1, 1, seed=1234)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=KV_HEADS, kv_channels=HEAD_DIM, attention_dropout=0.0)
    return SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _step(module, tensors, params) -> None:
    q, k, v, grad = tensors
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    module(q, k, v, None, packed_seq_params=params).backward(grad)


def main(argv=None) -> int:
    from megatron_patch.models.idefics2.sdpa_attention import row_segments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "packed_attention.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = _module()
    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(SEQ, 1, HEADS, HEAD_DIM, generator=g), torch.randn(SEQ, 1, KV_HEADS, HEAD_DIM, generator=g),
               torch.randn(SEQ, 1, KV_HEADS, HEAD_DIM, generator=g), torch.randn(SEQ, 1, HEADS * HEAD_DIM, generator=g))
    cases = {}
    for pack, lengths in PACKS.items():
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        for plan, by_length in PLANS.items():
            params = row_segments(cu, 1, SEQ, by_length=by_length)  # once per micro-batch, as the model does
            cases[(pack, plan)] = params
            _step(module, tensors, params)  # warm-up
    times = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case, params in cases.items():
            start = time.perf_counter()
            _step(module, tensors, params)
            times[case].append(time.perf_counter() - start)
    rows = {plan: {pack: round(1000 * statistics.median(times[(pack, plan)]), 1) for pack in PACKS} for plan in PLANS}
    for plan, row in rows.items():
        row["skewed_over_two"] = round(row["skewed"] / row["two"], 2)
        print(plan, json.dumps(row), flush=True)
    result = {"benchmark": "packed_attention", "seq": SEQ, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "unit": "median ms, forward + backward", "rounds": args.rounds, "threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__, "plans": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
