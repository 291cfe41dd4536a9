"""LoRA fine-tuning flags and their place in the build (the adapters themselves: models/idefics2/lora.py).

    --lora-rank R                 turns LoRA on (every base weight frozen, adapters trained)
    --lora-alpha A                scale A / R as peft (default: R, a scale of 1; peft's own default is 8)
    --lora-dropout P              on the adapters' input, as peft (default 0)
    --lora-target-modules NAMES   which projections (default: the language model's seven); see _targets
    --lora-modules-to-save NAMES  peft's modules_to_save: modules trained fully beside the adapters
    --lora-load PEFT_DIR          start from a peft adapter folder: rank, alpha, targets from it
    --lora-base CKPT              resuming a LoRA checkpoint: its base, when not at the recorded path

A LoRA run starts from a full checkpoint (`--load BASE`, a release or with --finetune) and saves
its adapters alone, recording BASE (checkpoint/adapters.py). `--load` of a LoRA checkpoint resumes
it: rank, alpha and targets come from it, the base weights from the recorded base (or --lora-base),
checked to be the same weights.

`check_lora_args` (called by `validate_args`) sets `args.lora` (a `LoraSettings` or None),
`args.lora_record` (what saves record, or None), `args.base_load` / `args.base_iteration` (the full
checkpoint the base weights come from) and `args.load_adapters` (--load holds adapters).
"""
from __future__ import annotations

from pathlib import Path

from megatron_patch.models.idefics2.lora import DEFAULT_TARGETS, LoraSettings
from megatron_patch.models.idefics2.weight_mapping import (
    ALL_LORA_TARGETS,
    LORA_COMPONENTS,
    LORA_MODULES_TO_SAVE,
    split_lora_target,
    targets_inside,
)

_FREEZE = ("--freeze-llm", "freeze_llm"), ("--freeze-clip-vision-tower", "freeze_clip_vision_tower"), \
    ("--freeze-perceiver", "freeze_perceiver")


def add_lora_arguments(parser) -> None:
    g = parser.add_argument_group("LoRA (peft-compatible adapters; the whole base frozen)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R", help="turn LoRA on with adapters of rank R")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="scale = A / R as peft (default: R, i.e. scale 1; peft's LoraConfig defaults to 8)")
    g.add_argument("--lora-dropout", type=float, default=None, metavar="P", help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-target-modules", default=None, metavar="NAMES",
                   help="comma-separated projections (HF names): q_proj (the language model's), vision_model.fc1, "
                        "perceiver_resampler.k_proj, modality_projection.down_proj; a component alone (vision_model) for "
                        f"all of its projections; all-linear for every one (default: {','.join(DEFAULT_TARGETS)})")
    g.add_argument("--lora-modules-to-save", default=None, metavar="NAMES",
                   help="peft's modules_to_save, comma-separated: modules trained fully beside the adapters and exported "
                        f"whole ({', '.join(LORA_MODULES_TO_SAVE)}; e.g. connector)")
    g.add_argument("--lora-load", default=None, metavar="PEFT_DIR",
                   help="start from a peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    g.add_argument("--lora-base", default=None, metavar="CKPT",
                   help="resuming a LoRA checkpoint (--load): the base checkpoint, if moved from the recorded path")


def _error(message: str):
    from megatron_patch.training.arguments import ArgumentError

    return ArgumentError(message)


def _targets(text: str) -> tuple:
    """--lora-target-modules: projections (bare: the language model's), components, or all-linear
    (peft's name for every linear but the output layer)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise _error("--lora-target-modules is empty; name at least one of " + ",".join(ALL_LORA_TARGETS))
    chosen = set()
    for name in names:
        if name == "all-linear":
            chosen.update(ALL_LORA_TARGETS)
        elif name in LORA_COMPONENTS and name != "text_model":
            chosen.update(t for t in ALL_LORA_TARGETS if t.startswith(name + "."))
        elif name in ALL_LORA_TARGETS:
            chosen.add(name)
        else:
            raise _error(f"--lora-target-modules {name}: not a supported projection; choose among "
                         f"{','.join(ALL_LORA_TARGETS)}, a component ({','.join(list(LORA_COMPONENTS)[1:])}) or all-linear")
    return tuple(t for t in ALL_LORA_TARGETS if t in chosen)


def _modules(text: str) -> tuple:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in LORA_MODULES_TO_SAVE:
            raise _error(f"--lora-modules-to-save {name}: not a supported module; choose among "
                         f"{','.join(LORA_MODULES_TO_SAVE)}")
    return tuple(n for n in LORA_MODULES_TO_SAVE if n in names)


def _check_fits(args, hf_config, lora: LoraSettings) -> None:
    """Adapters the layout cannot hold: on the perceiver's k/v when TP copies its key/value heads;
    targets inside a module trained fully; a tied embedding trained fully."""
    inside = targets_inside(lora.modules_to_save, lora.targets)
    if inside:
        raise _error(f"--lora-target-modules {inside[0]} lies inside --lora-modules-to-save "
                     f"{','.join(lora.modules_to_save)}: a module trained fully needs no adapter; drop one of them")
    if {"embed_tokens", "lm_head"} & set(lora.modules_to_save) and hf_config.text_config.tie_word_embeddings:
        raise _error("--lora-modules-to-save embed_tokens/lm_head: this model ties them (tie_word_embeddings); "
                     "training a tied embedding fully with LoRA is not supported")
    kv_heads = hf_config.perceiver_config.num_key_value_heads
    kv = {"perceiver_resampler.k_proj", "perceiver_resampler.v_proj"} & set(lora.targets)
    if kv and args.tensor_model_parallel_size > kv_heads:
        raise _error(f"--lora-target-modules {','.join(sorted(kv))} at --tensor-model-parallel-size "
                     f"{args.tensor_model_parallel_size}: the perceiver's {kv_heads} key/value heads are copied over the "
                     f"TP ranks; use TP <= {kv_heads} or leave them out")


def _saved_lora(args, iteration):
    """The "lora" record of --load's checkpoint (None: a full checkpoint, or no --load)."""
    from megatron_patch.checkpoint.info import CheckpointInfo
    from megatron_patch.checkpoint.layout import resolve_iteration

    if not args.load:
        return None, None
    _, folder = resolve_iteration(args.load, iteration)
    return CheckpointInfo.read(folder).lora, folder


def check_lora_args(args, hf_config, iteration=None) -> None:
    """Validate the LoRA flags (one line naming the flag); set `args.lora`, `args.lora_record`,
    `args.base_load`, `args.base_iteration` and `args.load_adapters` (module docstring)."""
    from megatron_patch.checkpoint.adapters import base_record, check_base, lora_record
    from megatron_patch.checkpoint.errors import CheckpointError

    args.lora, args.lora_record, args.load_adapters = None, None, False
    args.base_load, args.base_iteration = args.load, iteration
    saved, folder = _saved_lora(args, iteration)
    on = args.lora_rank is not None or args.lora_load is not None or saved is not None
    if not on:
        for dest in ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "lora_base"):
            if getattr(args, dest) is not None:
                raise _error(f"--{dest.replace('_', '-')} needs --lora-rank or --lora-load (LoRA is off)")
        return
    for flag, dest in _FREEZE:
        if getattr(args, dest):
            raise _error(f"{flag} with LoRA: with LoRA the whole base model is frozen already; drop {flag} "
                         "(--lora-modules-to-save trains a module fully beside the adapters)")
    if args.transformer_impl == "transformer_engine":
        raise _error("--transformer-impl transformer_engine with LoRA is not supported yet; use --transformer-impl local")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise _error(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.lora_dropout is not None and not 0.0 <= args.lora_dropout < 1.0:
        raise _error(f"--lora-dropout must be in [0.0, 1.0), got {args.lora_dropout}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise _error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    targets = None if args.lora_target_modules is None else _targets(args.lora_target_modules)
    modules = None if args.lora_modules_to_save is None else _modules(args.lora_modules_to_save)
    if saved is not None:
        args.lora = _from_checkpoint(args, targets, modules, saved, folder)
        _check_fits(args, hf_config, args.lora)
        try:
            args.base_load, args.base_iteration = check_base(saved, folder, args.lora_base)
        except CheckpointError as err:
            raise _error(str(err)) from None
        args.load_adapters = True
        args.lora_record = lora_record(args.lora, {**saved["base"], "path": str(Path(args.base_load).resolve())})
        return
    if args.lora_base is not None:
        raise _error(f"--lora-base is the base of a LoRA checkpoint given to --load; {args.load or 'no --load'} is "
                     "not one (starting LoRA, the base is --load itself)")
    if args.load and not args.finetune and iteration != "release":
        raise _error(f"--load {args.load} is a full checkpoint at iteration {iteration}: start LoRA on it with "
                     "--finetune (resuming continues LoRA checkpoints only)")
    if args.save and not args.load:
        raise _error("--save with LoRA needs --load BASE: a LoRA checkpoint holds the adapters alone and names "
                     "the base checkpoint they train")
    if args.lora_load is None:
        rank = args.lora_rank
        args.lora = LoraSettings(rank, float(args.lora_alpha if args.lora_alpha is not None else rank),
                                 args.lora_dropout or 0.0, targets or DEFAULT_TARGETS, modules or ())
    else:
        args.lora = _from_peft_folder(args, targets, modules, hf_config)
    _check_fits(args, hf_config, args.lora)
    if args.save:
        args.lora_record = lora_record(args.lora, base_record(args.load, iteration))


def _agreeing(args, targets, modules, loaded: LoraSettings, source: str) -> LoraSettings:
    """The settings of adapters loaded from `source`; flags naming another rank, alpha, targets or
    modules to save are refused; --lora-dropout may change the dropout."""
    disagree = [
        ("--lora-rank", args.lora_rank, loaded.rank, args.lora_rank is not None and args.lora_rank != loaded.rank),
        ("--lora-alpha", args.lora_alpha, loaded.alpha, args.lora_alpha is not None and args.lora_alpha != loaded.alpha),
        ("--lora-target-modules", args.lora_target_modules, ",".join(loaded.targets),
         targets is not None and targets != loaded.targets),
        ("--lora-modules-to-save", args.lora_modules_to_save, ",".join(loaded.modules_to_save) or "none",
         modules is not None and modules != loaded.modules_to_save),
    ]
    for flag, given, stored, differs in disagree:
        if differs:
            raise _error(f"{flag} {given} disagrees with {source}'s adapter ({stored}); drop {flag}")
    dropout = args.lora_dropout if args.lora_dropout is not None else loaded.dropout
    return LoraSettings(loaded.rank, loaded.alpha, dropout, loaded.targets, loaded.modules_to_save)


def _from_checkpoint(args, targets, modules, saved: dict, folder) -> LoraSettings:
    if args.lora_load is not None:
        raise _error(f"--lora-load with --load {args.load}: that LoRA checkpoint's adapters are loaded; "
                     "drop --lora-load")
    return _agreeing(args, targets, modules, LoraSettings.from_record(saved), f"--load {folder}")


def _from_peft_folder(args, targets, modules, hf_config) -> LoraSettings:
    from megatron_patch.models.idefics2.peft_adapter import PeftAdapterError, read_adapter_settings

    try:
        loaded = read_adapter_settings(args.lora_load, hf_config)
    except PeftAdapterError as err:
        raise _error(str(err)) from None
    return _agreeing(args, targets, modules, loaded, f"--lora-load {args.lora_load}")


# The FLOP count's components (training/flops.py) of a LoRA target's or a module to save's component.
_FLOP_COMPONENT = {"text_model": "llm", "vision_model": "vision", "perceiver_resampler": "connector",
                   "modality_projection": "connector", "connector": "connector"}


def flop_components(lora: LoraSettings) -> tuple[frozenset, frozenset]:
    """(components whose base weights do not train, components holding adapters) for the FLOP count.
    A module to save counts its component as trained (the perceiver is most of the connector's work;
    the modality projection alone is counted high); embed_tokens and lm_head leave the language
    model's count as it is (a lookup; one projection of the head)."""
    adapted = frozenset(_FLOP_COMPONENT[split_lora_target(t)[0]] for t in lora.targets)
    trained = frozenset(_FLOP_COMPONENT[m] for m in lora.modules_to_save if m in _FLOP_COMPONENT)
    return frozenset(_FLOP_COMPONENT.values()) - trained, adapted


def apply_lora(model, args, opts) -> None:
    """Adapters on this rank's model part (after the base weights are loaded, before DDP), filled from
    --lora-load or initialised as peft does; then every base weight frozen."""
    from megatron_patch.models.idefics2.lora import add_lora
    from megatron_patch.models.idefics2.peft_adapter import load_peft_adapter
    from megatron_patch.training.freezing import freeze_base_for_lora

    add_lora(model, args.lora, opts, args.hf_config, seed=args.seed)
    if args.lora_load:
        load_peft_adapter(model, args.lora_load, args.lora, args.hf_config, opts)
    freeze_base_for_lora(model, args.lora, args.hf_config, opts)
