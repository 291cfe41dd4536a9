"""Flags of `examples/idefics2/pretrain_megatron_idefics2.py`: Megatron-LM's names and meanings.

    args = parse_args()                  # parse + validate_args(args, $WORLD_SIZE); one-line exit 2 on error
    opts = parallel_options(args)        # -> models.idefics2.config.ParallelOptions
    frozen = frozen_components(args)     # subset of {"llm", "vision", "connector"}

The model comes from exactly one of `--load` (the checkpoint's `hf_config/`) or `--model-config`
(random weights). `validate_args` runs before any model is built: flag-only checks first, then it
reads a checkpoint's tracker, `checkpoint_info.json` and `hf_config/config.json` (or the
`--model-config` JSON) and the tokenizer's `tokenizer.json` (its ids must fit the model). It raises
`ArgumentError` with one line naming the flag, and then sets the derived fields:

    data_parallel_size   world_size // (TP x PP)
    global_batch_size    micro-batch x DP when not given; num_micro_batches = global / (micro x DP)
    lr_decay_iters       --train-iters when not given
    hf_config            transformers.Idefics2Config from --model-config or from the checkpoint
    tokenizer_dir        folder of tokenizer/processor files (--model-config's folder or ITER/hf_config/)
    load_iteration       resolved iteration to load (int or "release"), None without --load
    loading_release      True when load_iteration is "release"
    image_seq_len        the model's perceiver latents when --image-seq-len is not given
    metrics_jsonl        SAVE/metrics.jsonl when not given and --save is set
    params_dtype         torch.bfloat16 with --bf16, else torch.float32
    lora                 LoraSettings with --lora-rank / --lora-load, else None (training/lora.py)
Like Megatron-LM, --bf16 also turns on --accumulate-allreduce-grads-in-fp32, and TP = 1 turns
--sequence-parallel off.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

from megatron_patch.data.encoder import add_encoder_arguments
from megatron_patch.data.loader import add_data_arguments
from megatron_patch.errors import UserError
from megatron_patch.training.lora import add_lora_arguments, check_lora_args

PROG = "pretrain_megatron_idefics2"
CONFIG_FILE = "config.json"
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a loadable tokenizer
_FREEZE_FLAGS = {"freeze_llm": "llm", "freeze_clip_vision_tower": "vision", "freeze_perceiver": "connector"}


class ArgumentError(UserError, ValueError):
    """A flag (or flag combination) is unusable; the message is one line naming the flag."""


def build_parser() -> argparse.ArgumentParser:
    """The entry point's parser (no validation; `parse_args` adds it)."""
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                description="Pretrain or fine-tune Idefics2 on megatron-core.")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="LLM layers on the first stage (which also holds vision + connector)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters (fp32 main grads and optimizer state)")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--use-cpu-initialization", action="store_true", default=None,
                   help="create parameters on the CPU, then move them (default: only without CUDA)")
    for fusion in ("swiglu", "gelu", "dropout"):  # one switch here: any of them turns all bias fusions off
        g.add_argument(f"--no-bias-{fusion}-fusion", dest="no_bias_fusions", action="store_true",
                       help="turn megatron-core's bias+activation and bias+dropout+add fusions off (on with CUDA)")
    # Communication overlap, fusions and timeouts (Megatron-LM's flags).
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather updated parameters during the next forward (needs --use-distributed-optimizer "
                        "and --overlap-grad-reduce)")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                   default=None, help="off; default: on when apex's fused_weight_gradient_mlp_cuda is importable")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="how long a collective (or the start-up rendezvous) may wait for its peers")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro-batch size x DP size")
    g.add_argument("--seq-length", type=int, required=True)

    g = p.add_argument_group("schedule and optimizer")
    g.add_argument("--train-iters", type=int, default=None, help="required unless --skip-train")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate; required unless --skip-train")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global grad norm; 0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-skipped-iterations", type=int, default=10,
                   help="consecutive iterations skipped for NaN/Inf grads before training stops")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", default=None, help="Megatron checkpoint dir to start from (its hf_config/ defines the model)")
    g.add_argument("--iteration", default=None, help="iteration number or 'release' to load (default: the tracker's)")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-total-limit", type=int, default=None, metavar="N",
                   help="keep the N newest iteration folders (never the tracker's, nor release)")
    g.add_argument("--async-save", action="store_true",
                   help="copy the state to host memory at a save and write it in the background while training "
                        "goes on (one save in flight; costs a host copy of this rank's weights and optimizer state)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only: iteration 0, no optimizer / RNG / data position")
    g.add_argument("--model-config", default=None, metavar="CONFIG.json",
                   help="HF Idefics2 config.json to start from random weights; its folder holds the tokenizer")

    g = p.add_argument_group("stopping early (saves, then exits 0)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, finish the iteration, save it and exit")
    g.add_argument("--exit-signal", choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"], default="SIGTERM")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop after the iteration that passes this many minutes since start-up")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after an iteration divisible by this")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=None, help="default: the whole validation set")
    g.add_argument("--skip-train", action="store_true", help="only evaluate the loaded checkpoint")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None, metavar="PATH", help="default: SAVE/metrics.jsonl with --save")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-device peak, for MFU")
    g.add_argument("--wandb-project", default=None, help="log the metrics to this Weights & Biases project "
                   "(pip install -e '.[wandb]'; WANDB_MODE=offline without internet)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B keeps its files (default: ./wandb)")
    g.add_argument("--wandb-entity", default=None, help="the W&B team or user")

    g = p.add_argument_group("activation recompute")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("freezing")
    g.add_argument("--freeze-llm", action="store_true")
    g.add_argument("--freeze-clip-vision-tower", action="store_true")
    g.add_argument("--freeze-perceiver", action="store_true", help="modality projection + perceiver resampler")
    add_lora_arguments(p)

    add_data_arguments(p)
    add_encoder_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; a validation failure prints one `PROG: error: ...` line and exits 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args, _world_size())
    except ArgumentError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return args


def _world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ArgumentError(f"WORLD_SIZE={text!r} is not an integer; launch with torchrun or unset it") from None


def parallel_options(args):
    """The model's ParallelOptions from the flags."""
    import torch

    from megatron_patch.models.idefics2.config import ParallelOptions

    return ParallelOptions(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        use_cpu_initialization=args.use_cpu_initialization,
        bias_fusions=False if args.no_bias_fusions else None,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
    )


def frozen_components(args) -> frozenset:
    """Names among {"llm", "vision", "connector"} whose parameters are frozen."""
    return frozenset(name for dest, name in _FREEZE_FLAGS.items() if getattr(args, dest))


def validate_args(args, world_size: int) -> None:
    """Raise ArgumentError (one line, naming the flag) for unusable flags; then set derived fields."""
    _check_ranges(args, world_size)
    dp = _check_batch(args, world_size)
    _check_schedule(args)
    _check_dependencies(args)
    _check_data_paths(args)
    hf_config, tokenizer_dir, iteration = _model_source(args)
    _check_model(args, hf_config, world_size)
    check_lora_args(args, hf_config, iteration)  # sets args.lora, args.lora_record, args.base_load, ...

    args.data_parallel_size = dp
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    args.hf_config, args.tokenizer_dir = hf_config, tokenizer_dir
    args.load_iteration, args.loading_release = iteration, iteration == "release"
    if args.image_seq_len is None:
        args.image_seq_len = hf_config.perceiver_config.resampler_n_latents
    if args.metrics_jsonl is None and args.save:
        args.metrics_jsonl = str(Path(args.save) / "metrics.jsonl")
    args.params_dtype = parallel_options(args).params_dtype
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = True  # Megatron-LM: bf16 grads reduce in fp32
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # Megatron-LM: nothing to split the sequence over


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# (dest, minimum) for integer flags, checked when set.
_AT_LEAST = [
    ("tensor_model_parallel_size", 1), ("pipeline_model_parallel_size", 1), ("micro_batch_size", 1),
    ("global_batch_size", 1), ("seq_length", 2), ("train_iters", 1), ("lr_warmup_iters", 0),
    ("lr_decay_iters", 1), ("save_interval", 1), ("eval_interval", 1), ("eval_iters", 1), ("log_interval", 1),
    ("max_skipped_iterations", 1), ("recompute_num_layers", 1), ("num_workers", 0), ("pack_buffer_size", 1),
    ("image_size", 1), ("shortest_edge", 1), ("image_seq_len", 1), ("save_total_limit", 1), ("exit_interval", 1),
    ("distributed_timeout_minutes", 1),
]
# (dest, low, high, high is excluded) for float flags, checked when set.
_RANGES = [
    ("lr", 0.0, None, False), ("min_lr", 0.0, None, False), ("weight_decay", 0.0, None, False),
    ("clip_grad", 0.0, None, False), ("adam_beta1", 0.0, 1.0, True), ("adam_beta2", 0.0, 1.0, True),
    ("sgd_momentum", 0.0, 1.0, True), ("max_bad_sample_fraction", 0.0, 1.0, False),
]


def _check_ranges(args, world_size: int) -> None:
    if world_size < 1:
        raise ArgumentError(f"WORLD_SIZE must be >= 1, got {world_size}")
    for dest, minimum in _AT_LEAST:
        value = getattr(args, dest)
        if value is not None and value < minimum:
            raise ArgumentError(f"{_flag(dest)} must be >= {minimum}, got {value}")
    for dest, low, high, open_high in _RANGES:
        value = getattr(args, dest)
        if value is None:
            continue
        too_high = high is not None and (value >= high if open_high else value > high)
        if value < low or too_high:
            bound = "" if high is None else f", {high})" if open_high else f", {high}]"
            wanted = f"in [{low}{bound}" if high is not None else f">= {low}"
            raise ArgumentError(f"{_flag(dest)} must be {wanted}, got {value}")
    for dest in ("adam_eps", "peak_tflops", "exit_duration_in_mins"):
        value = getattr(args, dest)
        if value is not None and value <= 0:
            raise ArgumentError(f"{_flag(dest)} must be > 0, got {value}")


def _check_batch(args, world_size: int) -> int:
    """The data-parallel size; fills in --global-batch-size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size = {tp} x {pp}; change the layout or the number of processes")
    dp = world_size // (tp * pp)
    mbs = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    if args.global_batch_size % (mbs * dp):
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size x "
            f"data-parallel size = {mbs} x {dp} = {mbs * dp}; choose a multiple of {mbs * dp}")
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--sequence-parallel needs --seq-length ({args.seq_length}) to be a multiple of "
                            f"--tensor-model-parallel-size ({tp})")
    return dp


def _check_schedule(args) -> None:
    if not args.skip_train:
        for dest in ("train_iters", "lr"):
            if getattr(args, dest) is None:
                raise ArgumentError(f"{_flag(dest)} is required for training (or pass --skip-train to only evaluate)")
        if args.lr_decay_iters is None:
            args.lr_decay_iters = args.train_iters
    if args.lr is not None and args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is above --lr {args.lr}; lower --min-lr")
    # megatron-core's schedule needs the warmup to end before the decay does.
    if args.lr_decay_iters is not None and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
                            f"{args.lr_decay_iters} (default --train-iters); shorten the warmup")


def _check_dependencies(args) -> None:
    """Flags that need another flag (or exclude one)."""
    needs = [
        (args.save_interval is not None and not args.save, "--save-interval needs --save (where to save)"),
        (args.save_total_limit is not None and not args.save, "--save-total-limit needs --save (what to prune)"),
        (args.async_save and not args.save, "--async-save needs --save (where to write)"),
        (args.overlap_param_gather and not args.use_distributed_optimizer,
         "--overlap-param-gather needs --use-distributed-optimizer (it gathers the optimizer's parameter shards)"),
        (args.overlap_param_gather and not args.overlap_grad_reduce,
         "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)"),
        (args.eval_interval is not None and not args.valid_data_path,
         "--eval-interval needs --valid-data-path (what to evaluate on)"),
        (args.skip_train and not args.load, "--skip-train needs --load (a trained checkpoint to evaluate)"),
        (args.skip_train and not args.valid_data_path, "--skip-train needs --valid-data-path (what to evaluate on)"),
        (not args.skip_train and not args.data_path, "--data-path is required for training (or pass --skip-train)"),
        (args.iteration is not None and not args.load, "--iteration needs --load (the checkpoint dir to pick it from)"),
        (args.finetune and not args.load, "--finetune needs --load (the checkpoint whose weights to start from)"),
        (args.pack_sequences and args.transformer_impl == "transformer_engine",
         "--pack-sequences is not supported with --transformer-impl transformer_engine yet; use --transformer-impl local"),
    ]
    for failed, message in needs:
        if failed:
            raise ArgumentError(message)
    if args.recompute_granularity != "full":
        for dest in ("recompute_method", "recompute_num_layers"):
            if getattr(args, dest) is not None:
                raise ArgumentError(f"{_flag(dest)} needs --recompute-granularity full")
    else:
        for dest in ("recompute_method", "recompute_num_layers"):
            if getattr(args, dest) is None:
                raise ArgumentError(f"--recompute-granularity full needs {_flag(dest)}")
    if len(frozen_components(args)) == len(_FREEZE_FLAGS):
        raise ArgumentError("--freeze-llm, --freeze-clip-vision-tower and --freeze-perceiver together leave "
                            "nothing left to train; drop one of them")
    if args.transformer_impl == "transformer_engine":
        from megatron_patch.platform.accelerators import accelerators

        if not accelerators()["transformer_engine"]:
            raise ArgumentError("--transformer-impl transformer_engine: transformer_engine is not importable; "
                                "install it or use --transformer-impl local")


def _check_data_paths(args) -> None:
    """Blend syntax and that each shard location exists (the loader reads them only after the model
    is built): local folders and file:// must be directories, fsspec URLs must exist (``fs.exists``),
    pipe: commands are not run (only their ``{name}`` slot is checked)."""
    from megatron_patch.data.errors import ShardIndexError
    from megatron_patch.data.sampler import parse_data_path
    from megatron_patch.data.storage import open_location

    for dest in ("data_path", "valid_data_path"):
        if not getattr(args, dest):
            continue
        try:
            dirs, _ = parse_data_path(getattr(args, dest), _flag(dest))
        except ValueError as err:
            raise ArgumentError(str(err)) from None
        for folder in dirs:
            try:
                open_location(folder).check()  # LocationError: one line naming the URL
            except ShardIndexError as err:
                raise ArgumentError(f"{_flag(dest)}: {err}") from None


def _model_source(args):
    """(hf_config, tokenizer_dir, load_iteration) from --load or --model-config."""
    if args.load and args.model_config:
        raise ArgumentError("--load and --model-config are exclusive: --load's checkpoint already defines the "
                            "model (its hf_config/); drop --model-config, or drop --load to start from random weights")
    if args.load:
        return _from_checkpoint(args)
    if args.model_config:
        return _from_model_config(args.model_config) + (None,)
    raise ArgumentError("--load or --model-config is required to know the model: a Megatron checkpoint dir, "
                        "or an HF Idefics2 config.json to start from random weights")


def _from_checkpoint(args):
    from megatron_patch.checkpoint.config_files import HF_CONFIG_DIR
    from megatron_patch.checkpoint.errors import CheckpointError
    from megatron_patch.checkpoint.info import CheckpointInfo
    from megatron_patch.checkpoint.layout import holds_checkpoint, parse_iteration, resolve_iteration
    from megatron_patch.checkpoint.reshard import read_checkpoint_config

    root = Path(args.load)
    if not root.is_dir():
        raise ArgumentError(f"--load {root} does not exist")
    if not holds_checkpoint(root):
        raise ArgumentError(f"--load {root} holds no checkpoint (no tracker, no iter_*/release folder); "
                            "convert one with hf2mcore, or use --model-config to start from random weights")
    flag = "--load"
    try:
        requested = None
        if args.iteration is not None:
            flag = "--iteration"
            requested = parse_iteration(args.iteration)
        iteration, folder = resolve_iteration(root, requested)
        flag = "--load"
        CheckpointInfo.read(folder)
        hf_config = read_checkpoint_config(root, iteration)
    except CheckpointError as err:
        raise ArgumentError(f"{flag}: {err}") from None
    tokenizer_dir = folder / HF_CONFIG_DIR
    _check_tokenizer(tokenizer_dir, hf_config, "--load")
    return hf_config, tokenizer_dir, iteration


def _from_model_config(value):
    from megatron_patch.checkpoint.config_files import read_idefics2_config
    from megatron_patch.checkpoint.errors import CheckpointError

    path = Path(value)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ArgumentError(f"--model-config {path} does not exist")
    if path.name != CONFIG_FILE:
        raise ArgumentError(f"--model-config {path}: name the folder's {CONFIG_FILE} (tokenizer and processor "
                            "files are read next to it under their HF names)")
    try:
        hf_config = read_idefics2_config(path.parent)
    except CheckpointError as err:
        raise ArgumentError(f"--model-config: {err}") from None
    _check_tokenizer(path.parent, hf_config, "--model-config")
    return hf_config, path.parent


def _check_tokenizer(folder: Path, hf_config, flag: str) -> None:
    """The folder holds a tokenizer whose ids fit the model: its <image> token, every id < vocab_size."""
    if not any((folder / name).is_file() for name in _VOCAB_FILES):
        raise ArgumentError(f"{flag}: {folder} holds no tokenizer ({' / '.join(_VOCAB_FILES)}); save the model's "
                            "tokenizer there (tokenizer.save_pretrained)")
    path = folder / "tokenizer.json"
    if not path.is_file():
        return  # a slow tokenizer only: the encoder checks its tokens when it loads it
    stat = path.stat()
    try:
        added, highest = _token_ids(str(path), (stat.st_mtime_ns, stat.st_size))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ArgumentError(f"{flag}: {path} is not a valid tokenizer.json ({err})") from None
    image, vocab = added.get("<image>"), hf_config.text_config.vocab_size
    if image is not None and image != hf_config.image_token_id:
        raise ArgumentError(f"{flag}: the tokenizer in {folder} has <image> = {image} but the model config's "
                            f"image_token_id is {hf_config.image_token_id}; use the tokenizer the model was built with")
    if highest >= vocab:
        raise ArgumentError(f"{flag}: the tokenizer in {folder} has token ids up to {highest} but the model's "
                            f"text_config.vocab_size is {vocab}; use the tokenizer the model was built with")


@functools.lru_cache(maxsize=4)
def _token_ids(path: str, stamp: tuple) -> tuple:
    """({added token: id}, highest id) of a tokenizer.json; `stamp` (mtime, size) keys the cache."""
    data = json.loads(Path(path).read_text())
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    vocab = (data.get("model") or {}).get("vocab") or ()
    return added, max([len(vocab) - 1, *added.values()])


def _check_model(args, hf_config, world_size: int) -> None:
    from megatron_patch.models.idefics2.config import validate_layout

    try:
        validate_layout(hf_config, parallel_options(args), world_size)
    except ValueError as err:
        message = str(err)
        if "--" not in message:  # a setting of the model's config: name where that config came from
            message = f"{'--load' if args.load else '--model-config'}: {message}"
        raise ArgumentError(message) from None
    latents = hf_config.perceiver_config.resampler_n_latents
    if args.image_seq_len is not None and args.image_seq_len != latents:
        raise ArgumentError(f"--image-seq-len {args.image_seq_len} differs from the model's perceiver latents "
                            f"({latents}): each image fills exactly that many <image> tokens; drop the flag")
