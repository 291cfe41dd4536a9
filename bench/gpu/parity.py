"""Parity with transformers' Idefics2 on this process's device (CUDA where there is one), fp32 and bf16.

The GPU half of the parity tests: the test suite checks every layout on CPU ranks; this runs the same
tiny models (`tests/models/idefics2_cases.py`) at TP1 x PP1 with both models on the device in each dtype and
records, per case, the max abs difference of the vision output, connector output and logits:
a Mistral-style LLM, a tied Llama-style LLM, Llama-3 RoPE scaling (factor 8), Mistral's sliding window
(5 tokens, below the 42-token samples), and packed rows against
one sample per row (the packed attention path); then the loss and every gradient of one training
micro-batch (max |ours - transformers| over max(max |transformers|, 1) per tensor). fp32 runs with TF32 off,
so both models do true fp32 matmuls and convolutions.

    python -m bench.gpu.parity --out bench/results/gpu_parity.json     # from the repository root

Prints one line per check, writes all figures to --out, exits 1 if any is beyond its tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fp32: the CPU parity tests' tolerances, on every component. bf16: check_hf_parity's default, on the
# logits (vision and connector figures are recorded); gradients as the tests compare them, error over
# max(|reference|, 1) per tensor, since some are zero in exact arithmetic (key biases: softmax ignores
# a shift shared by all of a query's scores) and only rounding noise is left of them.
FORWARD_ATOL = {"fp32": 1e-4, "bf16": 5e-2}
CHECKED_COMPONENTS = {"fp32": ("vision", "connector", "logits"), "bf16": ("logits",)}
LOSS_RTOL = {"fp32": 1e-5, "bf16": 1e-2}
GRAD_TOL = {"fp32": 1e-5, "bf16": 5e-2}


def pair(text: str, tied: bool, dtype: str, rope=None, sliding_window=None):
    """(config, transformers model, our model), the same weights, both on the device in `dtype`."""
    from megatron_patch.models.idefics2.config import ParallelOptions
    from megatron_patch.platform import get_device
    from tests.models.idefics2_cases import build_from_hf, tiny_hf_model

    config, hf_model = tiny_hf_model(text, tied, rope_parameters=rope, sliding_window=sliding_window)
    ours = build_from_hf(config, hf_model, ParallelOptions(1, 1, params_dtype=DTYPES[dtype]))
    device = get_device()
    return config, hf_model.to(device=device, dtype=DTYPES[dtype]), ours.to(device)


def on_device(inputs: dict, dtype: str) -> dict:
    from megatron_patch.platform import get_device

    # The packed-row boundaries stay on the host, as training keeps them (the model plans its segments there).
    return {k: v if k == "cu_seqlens" else v.to(get_device(), dtype=DTYPES[dtype] if k == "pixel_values" else None)
            for k, v in inputs.items() if torch.is_tensor(v)}


def forward_case(text: str, tied: bool, num_images: int, dtype: str, rope=None, sliding_window=None,
                 text_tokens: int = 12) -> dict:
    from megatron_patch.testing.parity import hf_outputs, max_abs_diffs, megatron_outputs, random_inputs

    config, hf_model, ours = pair(text, tied, dtype, rope, sliding_window)
    inputs = on_device(random_inputs(config, batch_size=2, num_images=num_images, text_tokens=text_tokens, seed=7),
                       dtype)
    with torch.no_grad():
        mine = megatron_outputs([ours.eval()], inputs, config.text_config.vocab_size)
        reference = {k: v.detach().cpu() for k, v in hf_outputs(hf_model.eval(), inputs).items()}
    diffs = max_abs_diffs(mine, reference)
    diffs["logit_std"] = float(reference["logits"].float().std())
    return diffs


def packed_case(dtype: str) -> dict:
    """Three samples one per row, and packed two rows as [s0 s1] [s2 pad]: the same logits."""
    from megatron_patch.testing.parity import megatron_outputs, random_inputs
    from tests.models.idefics2_cases import pack_rows

    config, _, ours = pair("mistral", False, dtype)
    inputs = random_inputs(config, batch_size=3, num_images=2, seed=5)
    vocab = config.text_config.vocab_size
    with torch.no_grad():
        alone = megatron_outputs([ours.eval()], on_device(inputs, dtype), vocab)["logits"]
        packed = megatron_outputs([ours], on_device(pack_rows(inputs, [[0, 1], [2]]), dtype), vocab)["logits"]
    seq = inputs["input_ids"].shape[1]
    from_packed = torch.stack([packed[0, :seq], packed[0, seq:], packed[1, :seq]])
    return {"logits": float((alone.double() - from_packed.double()).abs().max()), "logit_std": float(alone.float().std())}


def loss_and_grads_case(text: str, tied: bool, dtype: str) -> dict:
    """One micro-batch forward and backward through both: loss and per-tensor gradient errors."""
    from megatron_patch.models.idefics2.config import ParallelOptions
    from megatron_patch.models.idefics2.model_loading import assemble_hf_tensors, local_tensors, pipeline_layout
    from megatron_patch.testing.parity import random_inputs

    config, hf_model, ours = pair(text, tied, dtype)
    inputs = on_device(random_inputs(config, batch_size=2, num_images=2, seed=11), dtype)
    ids = inputs["input_ids"]
    theirs = hf_model.train()(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                              pixel_attention_mask=inputs["pixel_attention_mask"], labels=ids).loss
    theirs.backward()
    labels = torch.roll(ids, -1, dims=1)  # Megatron-style labels: the next token; the last position counts nothing
    loss_mask = torch.ones_like(ids, dtype=torch.float32)
    loss_mask[:, -1] = 0
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    per_token = ours.train()(ids, positions, inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["image_mask"],
                             labels=labels)
    mine = (per_token.float() * loss_mask).sum() / loss_mask.sum()
    mine.backward()
    opts = ParallelOptions(1, 1, params_dtype=DTYPES[dtype])
    shards = {(0, 0, k): v.cpu() for k, v in local_tensors(ours, opts, grads=True).items()}
    grads = assemble_hf_tensors(shards, config, pipeline_layout(config, opts), 1, sum_tied=True)
    errors = {}
    for name, p in hf_model.named_parameters():
        ref = p.grad.detach().double().cpu()
        errors[name] = float((grads[name].double() - ref).abs().max()) / max(float(ref.abs().max()), 1.0)
    worst = max(errors, key=errors.get)
    a, b = mine.item(), theirs.item()
    return {"loss_ours": a, "loss_transformers": b, "loss_rel_diff": abs(a - b) / abs(b),
            "grad_tensors": len(errors), "worst_grad": worst, "worst_grad_error": errors[worst]}


def fused_kernels_case() -> dict:
    """The LLM's core attention calls (causal, sliding window, packed rows; GQA; bf16, forward and
    backward) under `sdpa_kernel([FLASH, EFFICIENT, CUDNN])`: SDPA raises where a call would need the
    math kernel (its fp32 [b, h, sq, sk] scores), so each call must find a fused one. CUDA only."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_patch.models.idefics2.sdpa_attention import SDPAttention, row_segments

    seq, heads, groups, dim = 1024, 8, 2, 64
    calls = {"causal": ({}, None), "window 256": ({"window_size": (255, 0)}, None),
             "packed rows": ({}, torch.tensor([0, 700, 730, 1024], dtype=torch.int32, device="cuda"))}
    failures = {}
    for name, (extra, cu) in calls.items():
        config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                                   num_query_groups=groups, kv_channels=dim, attention_dropout=0.0, **extra)
        module = SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        q = torch.randn(seq, 1, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(seq, 1, groups, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        packed = row_segments(cu, 1, seq) if cu is not None else None
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                module(q, k, v, None, packed_seq_params=packed).float().sum().backward()
        except RuntimeError as err:
            failures[name] = str(err).splitlines()[0]
    return {"check": "core attention on fused SDPA kernels", "dtype": "bf16", "calls": sorted(calls),
            "math_fallback": failures, "ok": not failures}


def run(dtype: str) -> list[dict]:
    from megatron_patch.testing.parity import use_true_fp32
    from tests.models.idefics2_cases import llama3_rope

    use_true_fp32(dtype == "fp32")
    checks = []

    def forward(name, diffs):
        ok = diffs["logit_std"] > 0.1 and all(diffs[k] < FORWARD_ATOL[dtype] for k in CHECKED_COMPONENTS[dtype] if k in diffs)
        checks.append({"check": name, "dtype": dtype, **diffs, "tolerance": FORWARD_ATOL[dtype], "ok": ok})

    forward("forward mistral", forward_case("mistral", False, 2, dtype))
    forward("forward llama tied", forward_case("llama", True, 3, dtype))
    forward("forward llama3 rope x8", forward_case("llama", True, 3, dtype, rope=llama3_rope(8)))
    forward("forward mistral sliding window 5", forward_case("mistral", False, 2, dtype, sliding_window=5,
                                                             text_tokens=30))
    forward("packed rows = one per row", packed_case(dtype))
    for text, tied in (("mistral", False), ("llama", True)):
        r = loss_and_grads_case(text, tied, dtype)
        ok = r["loss_rel_diff"] < LOSS_RTOL[dtype] and r["worst_grad_error"] < GRAD_TOL[dtype]
        checks.append({"check": f"loss and grads {text}", "dtype": dtype, **r,
                       "tolerance": {"loss": LOSS_RTOL[dtype], "grad": GRAD_TOL[dtype]}, "ok": ok})
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--out", default=str(REPO / "bench/results/gpu_parity.json"))
    args = p.parse_args()
    import megatron.core

    from megatron_patch.platform import get_device, init_distributed

    init_distributed(1, 1, seed=1234)
    device = get_device()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "megatron_core": megatron.core.__version__, "checks": []}
    for dtype in args.dtypes:
        for check in run(dtype):
            result["checks"].append(check)
            print(json.dumps(check), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if device.type == "cuda" and "bf16" in args.dtypes:
        result["checks"].append(fused_kernels_case())
        print(json.dumps(result["checks"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    failed = [c["check"] + " " + c["dtype"] for c in result["checks"] if not c["ok"]]
    print(f"{len(result['checks']) - len(failed)}/{len(result['checks'])} checks within tolerance"
          + (f"; beyond: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
