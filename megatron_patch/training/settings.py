"""Read-only settings of a run, made once from the validated flags (arguments.py).

    settings = run_settings(args)     # after parse_args / validate_args; args is not written again
    settings.schedule.train_iters, settings.checkpoint.save, settings.logging.log_interval, settings.data

The loop, the checkpointer, the stop conditions and the data path (`DataSettings`, data/settings.py)
take these, not the argparse namespace: each field is typed, documented once and cannot be changed on
the way. The model's settings are `ParallelOptions` (models/idefics2/config.py); the optimizer is
built from the flags in optimizer.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from megatron_patch.data.settings import DataSettings


@dataclass(frozen=True)
class ScheduleSettings:
    """How long to train, in what batches, and when to stop early or evaluate."""

    train_iters: int
    global_batch_size: int  # samples per iteration over all DP ranks
    micro_batch_size: int
    seq_length: int
    skip_train: bool  # evaluate only
    eval_interval: Optional[int]  # iterations between evaluations (None: never; set only with a validation set)
    eval_iters: Optional[int]  # iterations of the global batch per evaluation (None: the whole set)
    max_skipped_iterations: int  # consecutive NaN/Inf iterations that stop training
    clip_grad: float  # global gradient-norm clip (0: off)
    exit_signal: Optional[str]  # the signal that saves and stops (--exit-signal-handler), e.g. SIGTERM
    exit_duration_in_mins: Optional[float]  # wall-clock budget from the start of the run
    exit_interval: Optional[int]  # stop after an iteration that is a multiple of it


@dataclass(frozen=True)
class CheckpointSettings:
    """Where a run saves and resumes from, and what a resume restores."""

    save: Optional[str]  # checkpoint folder written by training (None: no saves)
    save_interval: Optional[int]  # iterations between saves (the last iteration is always saved)
    save_total_limit: Optional[int]  # iteration folders kept (None: all)
    async_save: bool  # copy the state to host memory and write it in the background
    load: Optional[str]  # checkpoint folder to start from
    load_iteration: Optional[Union[int, str]]  # resolved iteration of --load (an int or "release")
    finetune: bool  # weights only: start at iteration 0 with a new schedule and optimizer
    base_load: Optional[str]  # full checkpoint the base weights come from (--load, or a LoRA checkpoint's base)
    base_iteration: Optional[Union[int, str]]
    load_adapters: bool  # --load is a LoRA checkpoint: its adapters are loaded after the base
    lora: Optional[dict]  # a LoRA run's record (checkpoint/adapters.py): saves hold the adapters alone
    save_optim: bool
    load_optim: bool
    load_rng: bool
    config_source: str  # folder whose tokenizer/processor files go into each save's hf_config/
    seed: int  # recorded; a resume must use the same (the data order follows it)
    optimizer: str  # "adam" or "sgd": which per-parameter state is saved
    sgd_momentum: float
    pack_sequences: bool  # recorded: packed loaders resume only at the same DP size


@dataclass(frozen=True)
class LoggingSettings:
    """What is logged, how often and where."""

    log_interval: int
    metrics_jsonl: Optional[str]
    tensorboard_dir: Optional[str]
    peak_tflops: Optional[float]  # the device's peak for the MFU (None: from the device's name)
    frozen: frozenset  # components whose base weights do not train (the FLOP count's backward)
    adapted: frozenset  # components holding LoRA adapters (their input gradients are computed)
    wandb_project: Optional[str]  # Weights & Biases project (None: no W&B)
    wandb_exp_name: Optional[str]
    wandb_save_dir: Optional[str]
    wandb_entity: Optional[str]


@dataclass(frozen=True)
class RunSettings:
    schedule: ScheduleSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    data: DataSettings


def run_settings(args) -> RunSettings:
    """The settings of a validated namespace (arguments.validate_args filled its derived fields)."""
    from megatron_patch.training.arguments import frozen_components
    from megatron_patch.training.lora import flop_components

    schedule = ScheduleSettings(
        train_iters=args.train_iters, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length, skip_train=bool(args.skip_train),
        eval_interval=args.eval_interval or None, eval_iters=args.eval_iters or None,
        max_skipped_iterations=args.max_skipped_iterations,
        clip_grad=args.clip_grad, exit_signal=args.exit_signal if args.exit_signal_handler else None,
        exit_duration_in_mins=args.exit_duration_in_mins, exit_interval=args.exit_interval or None)
    checkpoint = CheckpointSettings(
        save=args.save, save_interval=args.save_interval or None, save_total_limit=args.save_total_limit,
        async_save=bool(args.async_save),
        load=args.load, load_iteration=args.load_iteration, finetune=bool(args.finetune),
        base_load=args.base_load, base_iteration=args.base_iteration, load_adapters=args.load_adapters,
        lora=args.lora_record,
        save_optim=not args.no_save_optim, load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
        config_source=str(args.tokenizer_dir), seed=args.seed, optimizer=args.optimizer,
        sgd_momentum=args.sgd_momentum, pack_sequences=bool(args.pack_sequences))
    frozen, adapted = flop_components(args.lora) if args.lora else (frozen_components(args), frozenset())
    logging = LoggingSettings(log_interval=args.log_interval, metrics_jsonl=args.metrics_jsonl,
                              tensorboard_dir=args.tensorboard_dir, peak_tflops=args.peak_tflops,
                              frozen=frozen, adapted=adapted,
                              wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
                              wandb_save_dir=args.wandb_save_dir, wandb_entity=args.wandb_entity)
    return RunSettings(schedule, checkpoint, logging, data_settings(args))


def data_settings(args) -> DataSettings:
    """`DataSettings` from the flags (`loader.add_data_arguments`, `encoder.add_encoder_arguments`
    and Megatron's own). The training loader is endless: every rank stops at --train-iters, never
    on an empty loader."""
    return DataSettings(
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        data_path=args.data_path, valid_data_path=args.valid_data_path, seed=args.seed,
        num_workers=args.num_workers, max_bad_sample_fraction=args.max_bad_sample_fraction,
        pack_sequences=bool(args.pack_sequences), pack_buffer_size=args.pack_buffer_size, train_samples=None,
        answer_loss_only=bool(args.answer_loss_only), image_size=args.image_size,
        shortest_edge=args.shortest_edge, image_splitting=args.image_splitting, image_seq_len=args.image_seq_len,
    )
