"""Peak memory of the checkpoint converters on a synthetic Idefics2 checkpoint of >= 2 GB.

    python -m bench.bench_convert_memory                 # writes bench/results/convert_memory.json
    python -m bench.bench_convert_memory --workdir /scratch --keep

The synthetic checkpoint is written directly from the weight mapping's tensor names and shapes
(random fp32 data, sharded safetensors + index; no torch model is instantiated). Each converter run
is a fresh subprocess that reports its own peak resident set size (VmHWM in /proc/self/status), its
resident size right after imports (torch + megatron-core + transformers, paid by any tool), and the
wall time; the parent cross-checks the peak with getrusage(RUSAGE_CHILDREN). The round trip is
checked bit-exact tensor by tensor, then the multi-GB files are deleted.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "BENCH_RESULT "


def synthetic_config():
    """~2.4 GB in fp32: SigLIP-B-like vision, Mistral-like 6-layer 2048-wide LLM, 32k vocab."""
    from transformers import Idefics2Config

    return Idefics2Config(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=14),
        perceiver_config=dict(hidden_size=2048, resampler_n_latents=64, resampler_depth=1, resampler_n_heads=16,
                              resampler_head_dim=128, num_key_value_heads=4),
        text_config=dict(model_type="mistral", hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32000),
        image_token_id=31999,
    )


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_synthetic(folder: Path) -> int:
    import torch

    from megatron_patch.checkpoint.verify import hf_tensor_shapes
    from megatron_patch.conversion.hf_files import HFShardWriter

    config = synthetic_config()
    config.save_pretrained(str(folder))
    shapes = hf_tensor_shapes(config)
    writer = HFShardWriter(folder, {n: (torch.float32, s) for n, s in shapes.items()}, max_shard_bytes=500 * 10**6)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, generator=generator) * 0.02)
    writer.close()
    return writer.total_bytes


def child(tool: str, argv: list) -> None:
    """Runs inside the measured subprocess: import, note the baseline, convert, report."""
    import importlib

    module = importlib.import_module(f"toolkits.model_checkpoints_convertor.idefics2.{tool}")
    baseline = vm_kib("VmRSS")
    start = time.perf_counter()
    code = module.main(argv)
    seconds = time.perf_counter() - start
    print(MARK + json.dumps({"rc": code, "baseline_kib": baseline, "peak_kib": vm_kib("VmHWM"), "seconds": seconds}))


def measure(tool: str, argv: list) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK):])
    if result["rc"] != 0:
        raise RuntimeError(f"{tool} exited {result['rc']}:\n{out.stderr[-3000:]}")
    summary = [re.sub(r" -> \S+", "", line) for line in out.stdout.splitlines() if line.startswith(tool)]
    mib = 1024
    return {
        "tool": tool,
        "args": " ".join(a for a in argv if not a.startswith("/")),
        "peak_rss_mib": round(result["peak_kib"] / mib),
        "rss_after_imports_mib": round(result["baseline_kib"] / mib),
        "peak_minus_imports_mib": round((result["peak_kib"] - result["baseline_kib"]) / mib),
        "seconds": round(result["seconds"], 1),
        "summary": summary[-1] if summary else "",
    }


def check_round_trip(src: Path, back: Path) -> int:
    import torch

    from megatron_patch.conversion.hf_files import HFWeightsReader

    a, b = HFWeightsReader(src), HFWeightsReader(back)
    if sorted(a.names()) != sorted(b.names()):
        raise RuntimeError("round trip changed the tensor names")
    for name in a.names():
        if not torch.equal(a.get(name), b.get(name)):
            raise RuntimeError(f"round trip changed {name}")
    return len(a.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where the multi-GB files go (default: a temp dir)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "convert_memory.json"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        model_bytes = write_synthetic(work / "hf")
        print(f"synthetic checkpoint: {model_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = []
        plan = [
            ("hf2mcore", ["--load-path", str(work / "hf"), "--save-path", str(work / "mg11")]),
            ("hf2mcore", ["--load-path", str(work / "hf"), "--save-path", str(work / "mg22"),
                          "--target-tensor-model-parallel-size", "2", "--target-pipeline-model-parallel-size", "2"]),
            ("hf2mcore", ["--load-path", str(work / "hf"), "--save-path", str(work / "mg22b"),
                          "--target-tensor-model-parallel-size", "2", "--target-pipeline-model-parallel-size", "2",
                          "--memory-budget", "64MB"]),
            ("mcore2hf", ["--load-path", str(work / "mg22"), "--save-path", str(work / "back")]),
        ]
        for tool, argv in plan:
            runs.append(measure(tool, argv))
            print(json.dumps(runs[-1]), flush=True)
            for stale in ("mg11", "mg22b"):  # free disk early; mg22 feeds mcore2hf
                if (work / stale).exists():
                    shutil.rmtree(work / stale)
        tensors = check_round_trip(work / "hf", work / "back")
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: max over runs
        result = {
            "model_bytes": model_bytes,
            "model_gb": round(model_bytes / 1e9, 2),
            "round_trip_bit_exact_tensors": tensors,
            "max_child_ru_maxrss_mib": round(children_peak / 1024),
            "runs": runs,
            "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
