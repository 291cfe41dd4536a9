"""Core attention of one LLM layer, forward + backward: megatron-core's unfused DotProductAttention vs SDPAttention.

Same inputs for all (fp32 by default; 8 query heads, 2 key/value heads, head dim 64, batch 2), in
one run: causal rows (no mask tensor); packed rows of four segments each, given to the unfused
path as the block-diagonal causal mask of `testing.attention_masks.packed_causal_mask` ("unfused"), to SDPAttention
once as that same mask ("sdpa") and once as segments, `row_segments`, which is what the model
passes ("sdpa_segments"); and a causal sliding window of a quarter of the sequence, given to the
unfused path and to SDPAttention as its dense [s, s] mask ("unfused", "sdpa") and to SDPAttention
built with `window_size` ("sdpa_window", what the model runs: blocks, no [s, s] mask). Timing rounds alternate the implementations so machine noise hits them
alike; best and median of the rounds are reported. Peak
memory is measured in a fresh child process per case: on CUDA `torch.cuda.max_memory_allocated`, on
CPU the growth of the process's peak RSS (VmHWM, reset first) over its RSS before the call (a coarse figure: the
allocator may keep freed memory). `scores_mib` is the size of one fp32 score matrix [b, heads, s, s],
which the unfused path materialises (and its softmax output, and their gradients) and SDPA does not.
`speedup_median` is the unfused median over the median of the path the model uses (the last column).

    python -m bench.bench_core_attention               # writes bench/results/core_attention.json
    python -m bench.bench_core_attention --seqs 512 --rounds 2 --out /tmp/a.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

HEADS, KV_HEADS, HEAD_DIM, BATCH = 8, 2, 64, 2
IMPLS = {"causal": ("unfused", "sdpa"), "packed": ("unfused", "sdpa", "sdpa_segments"),
         "window": ("unfused", "sdpa", "sdpa_window")}


def window_of(seq: int, masking: str):
    """Keys per query of the "window" case (a quarter of the sequence), else None."""
    return seq // 4 if masking == "window" else None


def _setup():
    """megatron-core state for one process (the unfused path needs its memory buffer and RNG tracker)."""
    from megatron_patch.platform import get_device, init_distributed

    init_distributed(1, 1, seed=1234)
    return get_device()


def _modules(dtype: torch.dtype, device, window=None):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.models.idefics2.sdpa_attention import SDPAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
        kv_channels=HEAD_DIM, attention_dropout=0.0, masked_softmax_fusion=False, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
    )
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    sdpa = SDPAttention(**args).to(device)
    modules = {"unfused": DotProductAttention(**args).to(device), "sdpa": sdpa, "sdpa_segments": sdpa}
    if window is not None:
        import dataclasses

        windowed = dataclasses.replace(config, window_size=(window - 1, 0))
        modules["sdpa_window"] = SDPAttention(**{**args, "config": windowed}).to(device)
    return modules


def _inputs(seq: int, masking: str, dtype: torch.dtype, device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, BATCH, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    k = torch.randn(seq, BATCH, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(seq, BATCH, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    grad = torch.randn(seq, BATCH, HEADS * HEAD_DIM, generator=g).to(device, dtype)
    cu = None
    if masking == "packed":  # four segments per row, of uneven lengths
        cuts = [0, seq // 8, seq // 2, (3 * seq) // 4, seq]
        cu = torch.tensor([row * seq + c for row in range(BATCH) for c in cuts[:-1]] + [BATCH * seq], dtype=torch.int32)
        cu = cu.to(device)
    return q, k, v, grad, cu


def _window_mask(seq: int, window: int, device) -> torch.Tensor:
    """[1, 1, s, s], True = masked: a query sees itself and the window - 1 keys before it."""
    offset = torch.arange(seq, device=device)[:, None] - torch.arange(seq, device=device)[None, :]
    return ((offset < 0) | (offset >= window)).view(1, 1, seq, seq)


def _step(impl: str, module, q, k, v, grad, cu, window=None):
    """One forward + backward (packed rows as the dense mask, or as segments; a window as its dense
    mask, or by the module's window_size); returns (output, dq, dk, dv)."""
    from megatron_patch.testing.attention_masks import packed_causal_mask
    from megatron_patch.models.idefics2.sdpa_attention import row_segments

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    seq = q.shape[0]
    if window is not None and impl != "sdpa_window":  # the mask is part of what this path costs
        out = module(q, k, v, _window_mask(seq, window, q.device))
    elif cu is None:
        out = module(q, k, v, None)
    elif impl == "sdpa_segments":
        out = module(q, k, v, None, packed_seq_params=row_segments(cu, BATCH, seq))
    else:  # the mask is built inside the step: it is part of what this path costs
        out = module(q, k, v, packed_causal_mask(cu, BATCH, seq))
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(impl: str, seq: int, masking: str, dtype_name: str) -> dict:
    """Child-process body: peak memory of one forward + backward of `impl` beyond its inputs."""
    dtype = getattr(torch, dtype_name)
    device = _setup()
    window = window_of(seq, masking)
    module = _modules(dtype, device, window)[impl]
    small = _inputs(4 * 16, masking, dtype, device)  # kernels and lazy state loaded outside the measure
    _step(impl, module, *small, window and 16)
    tensors = _inputs(seq, masking, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(impl, module, *tensors, window)
        torch.cuda.synchronize()
        return {"peak_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1), "kind": "cuda allocated"}
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    _step(impl, module, *tensors, window)
    peak = _status_bytes("VmHWM")
    return {"peak_mib": round(max(peak - base, 0) / 2**20, 1), "kind": "cpu peak RSS growth"}


def _memory_in_child(impl: str, seq: int, masking: str, dtype_name: str, threads: int) -> dict:
    code = (
        "import json, torch; torch.set_num_threads(%d); "
        "from bench.bench_core_attention import measure_memory; "  # bench/ from the working directory, REPO
        "print('RESULT ' + json.dumps(measure_memory(%r, %d, %r, %r)))"
    ) % (threads, impl, seq, masking, dtype_name)
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"memory child failed for {impl} seq {seq} {masking}:\n{proc.stderr[-3000:]}")


def time_case(seq: int, masking: str, dtype, device, rounds: int) -> dict:
    window = window_of(seq, masking)
    modules = _modules(dtype, device, window)
    tensors = _inputs(seq, masking, dtype, device)
    impls = IMPLS[masking]
    results = {impl: _step(impl, modules[impl], *tensors, window) for impl in impls}  # warm-up, and the numbers check
    diff = max(float((a.float() - b.float()).abs().max())
               for impl in impls[1:] for a, b in zip(results["unfused"], results[impl]))
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            _sync(device)
            start = time.perf_counter()
            _step(impl, modules[impl], *tensors, window)
            _sync(device)
            times[impl].append(time.perf_counter() - start)
    row = {"seq": seq, "masking": masking, "window": window, "max_abs_diff": diff,
           "scores_mib": round(4 * BATCH * HEADS * seq * seq / 2**20, 1)}
    for impl in impls:
        row[f"{impl}_best_ms"] = round(1000 * min(times[impl]), 1)
        row[f"{impl}_median_ms"] = round(1000 * statistics.median(times[impl]), 1)
    row["speedup_median"] = round(row["unfused_median_ms"] / row[f"{impls[-1]}_median_ms"], 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--masking", nargs="+", default=["causal", "packed"], choices=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case child processes")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "core_attention.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = _setup()
    rows = []
    for masking in args.masking:
        for seq in args.seqs:
            row = time_case(seq, masking, dtype, device, args.rounds)
            if not args.no_memory:
                for impl in IMPLS[masking]:
                    mem = _memory_in_child(impl, seq, masking, args.dtype, args.threads)
                    row[f"{impl}_peak_mib"], row["memory_kind"] = mem["peak_mib"], mem["kind"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPU cores"
    result = {"benchmark": "core_attention", "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "batch": BATCH, "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds,
              "machine": machine, "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
