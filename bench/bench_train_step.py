"""One training step of our Idefics2 against transformers' on the same model, weights, batch and dtype.

Both models are built in one process from one Idefics2-shaped config (bigger than the tiny test model,
still CPU-feasible): SigLIP vision 256 hidden x 4 layers (224 px images, patch 14 -> 256 patches),
perceiver with 64 latents, Mistral-style LLM 512 hidden x 4 layers with GQA (8 heads, 2 key/value
heads), vocabulary 4096. transformers' `Idefics2ForConditionalGeneration` (SDPA) is randomised with
`randomize_weights` and copied into ours with the project's loader (`load_hf_weights`), at TP1 x PP1
on a gloo world of 1, fp32.

A step, for both: zero grads, forward with loss, backward, torch AdamW step over all parameters
(ours: a plain torch AdamW over the megatron-core module's parameters, not megatron's optimizer).
One micro-batch of 2 rows x seq, one 224 px image per row (<image> block at the start, random text
after); labels are the next tokens. Before timing, the two losses are checked to agree (rel 1e-4).
Rounds alternate (ours, transformers, ours, ...) per sequence length; medians are reported.
`--packed SEQ`: 2 x `--per-row` samples of random lengths (one image each); ours packs them into 2 rows
of SEQ (attention inside each sample), transformers gets one sample per row, right padded; tokens/s
count real tokens only, and the losses are checked to agree first.

    python -m bench.bench_train_step                          # seq 1024 and 2048, writes bench/results/train_step.json
    python -m bench.bench_train_step --seqs 1024 --rounds 3 --profile 1024
    python -m bench.bench_train_step --memory                 # also each step's memory (below), fresh process each
    python -m bench.bench_train_step --seqs --packed 2048 --per-row 4 --out bench/results/train_step_packed.json

On a GPU (used wherever CUDA is; `CUDA_VISIBLE_DEVICES=` for the CPU): `--size 1b` is a ~1B Idefics2-shaped model
(SigLIP 768 x 12 at 384 px, perceiver 64 latents x 3, LLM 2048 hidden x 16 layers with GQA, vocabulary
32,000), `--dtype bf16` runs both models with bf16 parameters and inputs (the same AdamW for both).
Steps are timed between CUDA synchronisations; rows add TFLOP/s and MFU from the project's one FLOP
count (`megatron_patch.training.flops`, the same useful work for both models) and the peak of CUDA
memory a step allocates above the resident models.

Memory on CPU (`--memory`, a fresh process per model and length) is two figures: the peak-RSS growth
over the first two steps (VmHWM, what the OS sees; it includes glibc heap fragmentation, which depends
on the order and sizes of allocations as much as on their total), and the peak of live tensor bytes
during a third step above the bytes alive before it, the parameters and optimizer state (torch.profiler's
memory events, "Total Allocated": what a step needs, grads included; the CPU counterpart of the CUDA figure).

    python -m bench.bench_train_step --size 1b --dtype bf16 --seqs 2048 4096 --packed 4096 \
        --rounds 5 --out bench/results/train_step_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14)
TEXT = dict(
    model_type="mistral", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, vocab_size=4096, sliding_window=None, rope_theta=10000.0, tie_word_embeddings=False,
)
PERCEIVER = dict(hidden_size=512, resampler_n_latents=64, resampler_depth=2, resampler_n_heads=8, resampler_head_dim=64, num_key_value_heads=2)
SIZES = {
    "small": (VISION, TEXT, PERCEIVER),
    "1b": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=384, patch_size=14),
        dict(TEXT, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, vocab_size=32000),
        dict(PERCEIVER, hidden_size=2048, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=128, num_key_value_heads=4),
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}  # bf16: both round differently, the loss must still agree closely
ROWS = 2


def bench_config(size: str = "small"):
    from transformers import Idefics2Config

    vision, text, perceiver = SIZES[size]
    vocab = text["vocab_size"]
    return Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text, tie_word_embeddings=False,
                          image_token_id=vocab - 2, fake_image_token_id=vocab - 3)


def build_pair(size: str = "small", dtype: str = "fp32"):
    """(config, transformers model, our model) with the same weights, on this process's device (CUDA
    where there is one) in `dtype`; distributed state initialised."""
    from transformers import Idefics2ForConditionalGeneration

    from megatron_patch.models.idefics2.config import ParallelOptions
    from megatron_patch.platform import get_device, init_distributed
    from megatron_patch.testing.tiny import randomize_weights
    from tests.models.idefics2_cases import build_from_hf

    init_distributed(1, 1, seed=1234)
    device = get_device()
    config = bench_config(size)
    config._attn_implementation = "sdpa"
    for sub in (config.vision_config, config.perceiver_config, config.text_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # a 1B model is built where it runs, not on the host first
        hf = Idefics2ForConditionalGeneration(config)
    randomize_weights(hf, seed=0, scale=0.02)
    ours = build_from_hf(config, hf, ParallelOptions(1, 1, params_dtype=DTYPES[dtype], use_transformer_engine=False))
    return config, hf.to(DTYPES[dtype]).train(), ours.to(device).train()


def to_device(batch: dict, device, dtype: str) -> dict:
    """The batch where the models are; pixels in the models' dtype (ids, labels and masks unchanged);
    the packed-row boundaries stay on the host, as training keeps them."""
    return {k: v.to(device=device, dtype=DTYPES[dtype] if k == "pixel_values" else None)
            if torch.is_tensor(v) and k != "cu_seqlens" else v for k, v in batch.items()}


def make_batch(config, seq: int, seed: int = 0) -> dict:
    """2 rows x seq: [fake, <image> x latents, fake] then random text; one full 224 px image per row."""
    g = torch.Generator().manual_seed(seed)
    latents = config.perceiver_config.resampler_n_latents
    size = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    block = [config.fake_image_token_id] + [config.image_token_id] * latents + [config.fake_image_token_id]
    text = torch.randint(0, vocab - 3, (ROWS, seq - len(block)), generator=g)  # ids below the special ones
    input_ids = torch.cat([torch.tensor(block).expand(ROWS, -1), text], dim=1)
    labels = torch.roll(input_ids, -1, dims=1)  # already shifted, as our loss expects
    loss_mask = torch.ones(ROWS, seq)
    loss_mask[:, -1] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(ROWS, -1),
        "pixel_values": torch.randn(ROWS, 1, 3, size, size, generator=g),
        "pixel_attention_mask": torch.ones(ROWS, 1, size, size, dtype=torch.bool),
        "image_mask": torch.ones(ROWS, 1, dtype=torch.bool),
        "labels": labels,
        "loss_mask": loss_mask,
    }


def make_packed_batches(config, seq: int, per_row: int, seed: int = 0) -> tuple[dict, dict]:
    """The same ROWS * per_row samples (one image each, random lengths) two ways: ours packed into ROWS
    rows of seq (`cu_seqlens`, attention inside each sample), transformers' one sample per row, right
    padded to the longest (what an HF training loop does without packing)."""
    g = torch.Generator().manual_seed(seed)
    latents = config.perceiver_config.resampler_n_latents
    size = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    block = [config.fake_image_token_id] + [config.image_token_id] * latents + [config.fake_image_token_id]
    shortest = len(block) + 16
    samples, rows, bounds = [], [], [0]
    for _ in range(ROWS):
        cuts = sorted(torch.randperm(seq - per_row * shortest, generator=g)[: per_row - 1].tolist())
        lengths = [b - a + shortest for a, b in zip([0] + cuts, cuts + [seq - per_row * shortest])]
        row = []
        for n in lengths:
            ids = torch.cat([torch.tensor(block), torch.randint(0, vocab - 3, (n - len(block),), generator=g)])
            samples.append(ids)
            row.append(ids)
            bounds.append(bounds[-1] + n)
        rows.append(torch.cat(row))
    pixels = torch.randn(len(samples), 3, size, size, generator=g)
    ids = torch.stack(rows)
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones(ROWS, seq)
    loss_mask.view(-1)[torch.tensor(bounds[1:]) - 1] = 0  # a sample's last token predicts nothing
    cu = torch.tensor(bounds, dtype=torch.int32)
    ours = {"input_ids": ids, "position_ids": torch.arange(seq).unsqueeze(0).expand(ROWS, -1),
            "pixel_values": pixels.view(ROWS, per_row, 3, size, size),
            "pixel_attention_mask": torch.ones(ROWS, per_row, size, size, dtype=torch.bool),
            "image_mask": torch.ones(ROWS, per_row, dtype=torch.bool), "labels": labels, "loss_mask": loss_mask,
            "cu_seqlens": cu,
            "real_tokens": ROWS * seq}
    longest = max(len(x) for x in samples)
    hf_ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, x in enumerate(samples):
        hf_ids[i, : len(x)], mask[i, : len(x)] = x, 1
    theirs = {"input_ids": hf_ids, "attention_mask": mask, "hf_labels": hf_ids.masked_fill(mask == 0, -100),
              "pixel_values": pixels.unsqueeze(1), "pixel_attention_mask": torch.ones(len(samples), 1, size, size, dtype=torch.bool),
              "real_tokens": ROWS * seq}
    return ours, theirs


def hf_loss(hf, b):
    # transformers shifts labels itself: it gets the ids (or padding-masked ids), never our shifted `labels`
    return hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
              pixel_attention_mask=b["pixel_attention_mask"], labels=b.get("hf_labels", b["input_ids"])).loss


def our_loss(ours, b):
    per_token = ours(b["input_ids"], b["position_ids"], b["pixel_values"], b["pixel_attention_mask"], b["image_mask"],
                     labels=b["labels"], cu_seqlens=b.get("cu_seqlens"))  # on the host, as training keeps it
    return (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()


def make_step(model, loss_fn, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def check_losses(hf, ours, batch, hf_batch=None, rtol: float = 1e-4) -> dict:
    with torch.no_grad():
        a, b = float(hf_loss(hf, batch if hf_batch is None else hf_batch)), float(our_loss(ours, batch))
    rel = abs(a - b) / abs(a)
    if rel > rtol:
        raise SystemExit(f"losses differ: transformers {a:.6f}, ours {b:.6f} (rel {rel:.2e} > {rtol:g}); not the same computation")
    return {"transformers": a, "ours": b, "rel_diff": rel}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_flops(config, seq: int, num_images: int) -> float:
    """The useful work of one step (the project's FLOP count; full-size images), the same for both models."""
    from megatron_patch.training.flops import BatchShapes, training_flops

    side = config.vision_config.image_size // config.vision_config.patch_size
    return training_flops(config, BatchShapes.from_patches(ROWS, seq, [side * side] * num_images))


def step_memory_cpu(impl: str, seq: int) -> dict:
    """{"peak_rss_growth_mib", "peak_live_tensors_mib"} of `impl` at `seq`, in a fresh process (VmHWM:
    ru_maxrss would carry the parent's peak over fork): peak-RSS growth over two steps (the first
    creates the optimizer state) above the RSS after building both models; peak live tensor bytes of
    a third step (grads included) above those alive before it."""
    out = subprocess.run([sys.executable, "-m", "bench.bench_train_step", "--_memory-child", impl, str(seq)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_live_tensors_mib(step) -> float:
    """MiB: the most tensor bytes alive during `step()` above those alive when it starts (CPU allocator
    events of torch.profiler; independent of how the C library's heap reuses freed memory)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        raise SystemExit("torch.profiler recorded no memory events: cannot measure live tensor bytes")
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - start) / 2**20


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(impl: str, seq: int) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config, hf, ours = build_pair()
    batch = make_batch(config, seq)
    model, loss_fn = (hf, hf_loss) if impl == "transformers" else (ours, our_loss)
    step = make_step(model, loss_fn, batch)
    del hf, ours
    before = _vm_hwm_mib()
    step()
    step()
    rss = _vm_hwm_mib() - before
    # Grads freed outside the profiler: the step under it allocates them again, and every tensor it
    # frees was allocated under it (the allocator events count frees only of what they saw allocated).
    for param in model.parameters():
        param.grad = None
    live = peak_live_tensors_mib(step)
    print(json.dumps({"peak_rss_growth_mib": round(rss, 1), "peak_live_tensors_mib": round(live, 1)}))


def profile_step(step, top: int = 12) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="*", default=[1024, 2048])
    p.add_argument("--packed", type=int, nargs="*", default=[],
                   help="also these row lengths with --per-row samples packed per row (transformers: one per row, padded)")
    p.add_argument("--per-row", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="peak RSS growth and peak live tensor bytes of a step per impl and seq (fresh process each)")
    p.add_argument("--memory-only", action="store_true", help="add --memory figures to the rows of an existing --out")
    p.add_argument("--profile", type=int, nargs="*", default=[], help="seq lengths to profile one step of each at")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (1b: for a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameters and inputs of both models")
    p.add_argument("--out", default=str(REPO / "bench/results/train_step.json"))
    p.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory_child:
        return _memory_child(args._memory_child[0], int(args._memory_child[1]))
    os.environ["BENCH_THREADS"] = str(args.threads)
    if args.memory_only:
        result = json.loads(Path(args.out).read_text())
        for row in result["seqs"]:
            if row["seq"] in args.seqs and "packed_samples_per_row" not in row:
                figures = _memory_figures(row["seq"])
                row.update(figures)
                print(row["seq"], figures, flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    from megatron_patch.training.flops import device_name, mfu, peak_tflops

    config, hf, ours = build_pair(args.size, args.dtype)
    on_gpu = torch.cuda.is_available()
    gpu = device_name() if on_gpu else None
    peak = peak_tflops(gpu)
    params = {"transformers": sum(x.numel() for x in hf.parameters()), "ours": sum(x.numel() for x in ours.parameters())}
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, {args.threads} threads"
    result = {
        "machine": f"{gpu} (peak bf16 {peak} TFLOP/s), {machine}" if on_gpu else machine,
        "torch": torch.__version__, "dtype": str(DTYPES[args.dtype]).replace("torch.", ""),
        "layout": f"TP1 x PP1, {'nccl' if on_gpu else 'gloo'} world of 1", "size": args.size,
        "optimizer": "torch.optim.AdamW over all parameters, both models", "rounds": args.rounds, "rows": ROWS,
        "config": dict(zip(("vision", "text", "perceiver"), SIZES[args.size])), "parameters": params, "seqs": [],
    }
    device = next(ours.parameters()).device
    cases = [(seq, None, make_batch(config, seq), None) for seq in args.seqs]
    cases += [(seq, args.per_row, *make_packed_batches(config, seq, args.per_row)) for seq in args.packed]
    for seq, per_row, batch, hf_batch in cases:
        batch = to_device(batch, device, args.dtype)
        hf_batch = to_device(hf_batch, device, args.dtype) if hf_batch is not None else None
        losses = check_losses(hf, ours, batch, hf_batch, rtol=LOSS_RTOL[args.dtype])
        steps = {"ours": make_step(ours, our_loss, batch), "transformers": make_step(hf, hf_loss, hf_batch or batch)}
        for fn in steps.values():
            fn()  # warm-up, optimizer state created
        times = {k: [] for k in steps}
        step_memory = {}
        for _ in range(args.rounds):
            for name, fn in steps.items():
                if on_gpu:
                    resident = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                synchronize()
                start = time.perf_counter()
                fn()
                synchronize()
                times[name].append(time.perf_counter() - start)
                if on_gpu:
                    step_memory[name] = round((torch.cuda.max_memory_allocated() - resident) / 2**20, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        flops = step_flops(config, seq, ROWS * (per_row or 1))
        gpu_figures = {
            "tflops_per_s": {k: round(flops / t / 1e12, 1) for k, t in med.items()},
            "mfu": {k: (round(mfu(flops, t, 1, peak), 3) if peak else None) for k, t in med.items()},
            "step_peak_cuda_mib_above_models": step_memory,
        } if on_gpu else {}
        row = {
            "seq": seq, "loss_check": losses,
            **({"packed_samples_per_row": per_row, "transformers_rows": ROWS * per_row,
                "transformers_padded_length": hf_batch["input_ids"].shape[1]} if per_row else {}),
            "ours_ms": round(med["ours"] * 1e3, 1), "transformers_ms": round(med["transformers"] * 1e3, 1),
            "ours_tokens_per_s": round(ROWS * seq / med["ours"], 1),
            "transformers_tokens_per_s": round(ROWS * seq / med["transformers"], 1),
            "ratio_transformers_over_ours": round(med["transformers"] / med["ours"], 3),
            "ms_per_round": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()}, **gpu_figures,
        }
        if seq in args.profile and not per_row:
            row["profile_top_self_cpu"] = {k: profile_step(fn) for k, fn in steps.items()}
        del steps
        if args.memory and not per_row:
            row.update(_memory_figures(seq))
        result["seqs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile_top_self_cpu"}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    mfu_head = " ours TFLOP/s (MFU) | transformers TFLOP/s (MFU) |" if on_gpu else ""
    print(f"\n| seq | ours (ms) | transformers (ms) | ours tokens/s | transformers tokens/s | transformers / ours |{mfu_head}")
    print("|---|---|---|---|---|---|" + ("---|---|" if on_gpu else ""))
    for r in result["seqs"]:
        packed = f" packed x{r['packed_samples_per_row']}" if "packed_samples_per_row" in r else ""
        gpu_cells = "".join(f" {r['tflops_per_s'][k]:.0f} ({_percent(r['mfu'][k])}) |" for k in ("ours", "transformers")) if on_gpu else ""
        print(f"| {r['seq']:,}{packed} | {r['ours_ms']:,.0f} | {r['transformers_ms']:,.0f} | {r['ours_tokens_per_s']:,.0f} | "
              f"{r['transformers_tokens_per_s']:,.0f} | {r['ratio_transformers_over_ours']:.2f} |{gpu_cells}")


def _memory_figures(seq: int) -> dict:
    """{figure: {"ours": MiB, "transformers": MiB}} of `step_memory_cpu`."""
    per_impl = {k: step_memory_cpu(k, seq) for k in ("ours", "transformers")}
    return {figure: {k: v[figure] for k, v in per_impl.items()} for figure in per_impl["ours"]}


def _percent(fraction) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


if __name__ == "__main__":
    main()
