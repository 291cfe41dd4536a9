"""Check the Megatron Idefics2 against transformers' Idefics2 on the same random batch.

    torchrun --nproc-per-node T*P check_hf_parity.py --hf-path HF_DIR \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P [--num-images K] [--seed S] \
        [--atol A] [--bf16] [--save-outputs FILE.pt]
    # the Megatron model from a Megatron checkpoint saved at any layout (resharded on load):
    torchrun --nproc-per-node T*P check_hf_parity.py --hf-path HF_DIR --load MG_DIR [--iteration N] \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P

Builds the Megatron model at T x P through the project's weight mapping, with its weights from the
HF checkpoint at --hf-path (save_pretrained layout) or, with --load, from the Megatron checkpoint
there (its own config; the tracker's iteration unless --iteration). Runs both on a batch of text
with K images per sample of mixed sizes, prints the max abs difference per component, one report
line per rank and, last, `max_abs_logit_diff=<float>`. Exits 1 when that exceeds --atol, or with one
`error:` line when the input is unusable. Without --bf16 both models compute in true fp32 (TF32 off).

Memory on a cluster: without --load each rank reads from the safetensors files only the HF tensors
its pipeline stage maps from, one at a time (never the whole model), and only global rank 0 builds
transformers' model, after it has dropped its Megatron part. The batch comes from --seed on every
rank, so all ranks see the same inputs without a broadcast. On CUDA the Megatron part, the batch and
the reference model live on the rank's GPU; on CPU everything runs under gloo.

The per-rank report (`rank R (tp T, pp P): read N HF tensors, M bytes; ...`) says what each rank
read, whether transformers' Idefics2 modelling code was ever imported in it (it cannot have built
that model otherwise), whether it built the reference, and its peak resident memory.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys

import torch
import torch.distributed as dist

PROG = "check_hf_parity"
HF_MODELING_MODULE = "transformers.models.idefics2.modeling_idefics2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--hf-path", required=True, help="HF Idefics2 checkpoint directory (config.json + safetensors)")
    p.add_argument("--load", default=None, help="Megatron checkpoint directory: take the Megatron weights from it")
    p.add_argument("--iteration", default=None, help="with --load: iteration number or 'release' (default: the tracker's)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    p.add_argument("--num-images", type=int, default=2, help="images in the first sample (later ones have fewer)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None, help="max allowed logit diff (default 1e-4 fp32, 5e-2 bf16)")
    p.add_argument("--bf16", action="store_true", help="run both models in bfloat16")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="Megatron layers: local torch layers, or transformer-engine's (must be installed)")
    p.add_argument("--save-outputs", default=None, help="write the inputs used and the Megatron logits here (.pt)")
    args = p.parse_args(argv)
    if args.iteration is not None and args.load is None:
        p.error("--iteration needs --load")
    return args


def megatron_config(args):
    """(config the Megatron model is built from, iteration to load or None); checked against --hf-path."""
    from megatron_patch.checkpoint import CheckpointError, read_checkpoint_config
    from megatron_patch.checkpoint.config_files import read_idefics2_config
    from megatron_patch.checkpoint.layout import parse_iteration, resolve_iteration
    from megatron_patch.checkpoint.verify import hf_tensor_shapes
    from megatron_patch.conversion.hf_files import HFWeightsReader
    from megatron_patch.models.idefics2.weight_mapping import hf_tensor_names

    hf_config = read_idefics2_config(args.hf_path)
    if args.load is None:
        # Stages read different tensors: a missing one must stop every rank here, not one stage mid-load.
        reader = HFWeightsReader(args.hf_path)
        missing = [name for name in hf_tensor_names(hf_config) if name not in reader]
        if missing:
            raise CheckpointError(f"--hf-path {args.hf_path} lacks tensor {missing[0]} ({len(missing)} missing)")
        return hf_config, None
    requested = parse_iteration(args.iteration) if args.iteration is not None else None
    iteration, _ = resolve_iteration(args.load, requested)
    config = read_checkpoint_config(args.load, iteration)
    ours, theirs = hf_tensor_shapes(config), hf_tensor_shapes(hf_config)
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            raise CheckpointError(
                f"--load {args.load} (iteration {iteration}) and --hf-path {args.hf_path} describe different models: "
                f"tensor {name} is {ours.get(name, 'absent')} in --load, {theirs.get(name, 'absent')} in --hf-path"
            )
    return config, iteration


class CountedHFReads:
    """Tensor getter for `load_hf_weights`: each call reads one tensor from its safetensors file
    (HFWeightsReader, short-lived handle) and counts it, so the report says what this rank read."""

    def __init__(self, hf_dir):
        from megatron_patch.conversion.hf_files import HFWeightsReader

        self.reader = HFWeightsReader(hf_dir)
        self.names: set[str] = set()
        self.bytes = 0

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.reader.get(name)
        self.names.add(name)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


def rank_report(reads, reference_built: bool) -> dict:
    """What this rank did, measured here: HF tensors read, modelling code imported, peak RSS."""
    from megatron.core import parallel_state

    return {
        "rank": dist.get_rank(),
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "pp": parallel_state.get_pipeline_model_parallel_rank(),
        "tensors": len(reads.names) if reads else 0,
        "bytes": reads.bytes if reads else 0,
        "modeling_imported": HF_MODELING_MODULE in sys.modules,
        "reference": reference_built,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def format_report(r: dict) -> str:
    return (
        f"rank {r['rank']} (tp {r['tp']}, pp {r['pp']}): read {r['tensors']} HF tensors, {r['bytes']} bytes; "
        f"transformers Idefics2 modeling {'imported' if r['modeling_imported'] else 'never imported'}; "
        f"reference model {'built' if r['reference'] else 'not built'}; peak RSS {r['peak_rss_mib']:.0f} MiB"
    )


def release_model(device) -> None:
    """Hand the memory of dropped models back (heap pages to the OS, cached CUDA blocks)."""
    from megatron_patch.checkpoint.safetensors_io import release_freed_memory

    gc.collect()
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_diffs(args, dtype, device, inputs: dict, on_device: dict, ours: dict) -> dict:
    """Rank 0 only: build transformers' model on this rank's device, run it, compare; prints per component."""
    from transformers import Idefics2ForConditionalGeneration

    from megatron_patch.testing.parity import hf_outputs, max_abs_diffs

    hf_model = Idefics2ForConditionalGeneration.from_pretrained(args.hf_path, dtype=dtype).eval().to(device)
    reference = {k: v.cpu() for k, v in hf_outputs(hf_model, on_device).items()}
    del hf_model
    diffs = max_abs_diffs(ours, reference)
    for name in ("vision", "connector"):
        print(f"max_abs_{name}_diff={diffs[name]:.3e}")
    if args.save_outputs:
        torch.save({**inputs, "megatron_logits": ours["logits"]}, args.save_outputs)
        print(f"saved inputs and Megatron logits to {args.save_outputs}")
    return diffs


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_patch.checkpoint import CheckpointError, load_model_weights
    from megatron_patch.errors import one_line
    from megatron_patch.models.idefics2.config import ParallelOptions, validate_layout
    from megatron_patch.models.idefics2.model import build_model
    from megatron_patch.models.idefics2.model_loading import load_hf_weights
    from megatron_patch.platform import get_device, init_distributed
    from megatron_patch.testing.parity import megatron_outputs, random_inputs, use_true_fp32

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    atol = args.atol if args.atol is not None else (5e-2 if args.bf16 else 1e-4)
    use_true_fp32(not args.bf16)
    opts = ParallelOptions(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        params_dtype=dtype,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
    )
    try:  # before any process group or model exists; every rank sees the same error, rank 0 says it
        config, iteration = megatron_config(args)
        validate_layout(config, opts)
    except (CheckpointError, ValueError, OSError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 1
    init_distributed(opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, seed=args.seed)  # sets cuda:LOCAL_RANK
    validate_layout(config, opts, world_size=dist.get_world_size())
    device = get_device()
    model = build_model(config, opts, init_weights=False)  # every weight is loaded next
    reads = None
    if args.load is None:
        reads = CountedHFReads(args.hf_path)  # this rank's stage tensors only, one at a time
        load_hf_weights(model, reads, config, opts)
    else:
        load_model_weights(model, args.load, opts, iteration=iteration, hf_config=config)
    model = model.to(device).eval()

    # The same seed on every rank gives every rank the same batch: no broadcast needed.
    inputs = random_inputs(config, batch_size=args.batch_size, num_images=args.num_images, seed=args.seed)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    on_device = {k: v.to(device) for k, v in inputs.items()}
    ours = megatron_outputs([model], on_device, config.text_config.vocab_size)  # CPU tensors, rank 0 only
    del model
    release_model(device)  # rank 0 holds the reference next, not both models

    diffs = None
    if dist.get_rank() == 0:  # the other ranks wait in the gather below (torchrun ends them if this raises)
        if args.load is not None:
            print(f"Megatron weights: {args.load}, iteration {iteration}")
        diffs = reference_diffs(args, dtype, device, inputs, on_device, ours)
    reports = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rank_report(reads, reference_built=diffs is not None), reports, dst=0)
    if dist.get_rank() != 0:
        return 0
    for report in reports:
        print(format_report(report))
    builders = [r["rank"] for r in reports if r["reference"]]
    print("reference model on rank 0 only" if builders == [0] else f"reference model built on ranks {builders}")
    print(f"max_abs_logit_diff={diffs['logits']:.3e}")
    return 0 if diffs["logits"] <= atol else 1


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        from megatron_patch.platform import get_device

        verdict = torch.tensor([code], device=get_device())  # NCCL reduces only device tensors
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        code = int(verdict.item())
        dist.destroy_process_group()
    sys.exit(code)
