"""Training flags: a good command line parses with its derived fields; each bad one fails in one line
naming the flag (ArgumentError from validate_args; exit 2 with one stderr line from parse_args)."""
from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_patch.training.arguments import (
    ArgumentError,
    build_parser,
    frozen_components,
    parallel_options,
    parse_args,
    validate_args,
)
from tests.checkpoint.cli import hf2mcore
from tests.checkpoint.fixtures import save_idefics2

pytestmark = pytest.mark.unit


VOCAB, FAKE, IMAGE = 32003, 32000, 32001  # the Mistral tokenizer + Idefics2's added tokens


def _config(vocab_size=VOCAB, image_token_id=IMAGE):
    """The tiny Idefics2 with the real tokenizer's vocabulary and image token ids."""
    from megatron_patch.testing.tiny import tiny_idefics2_config

    config = tiny_idefics2_config("mistral", image_token_id=image_token_id, fake_image_token_id=FAKE)
    config.text_config.vocab_size = vocab_size
    return config


def _light_copy(src: Path, dst: Path) -> Path:
    """A checkpoint dir without the weights: validation reads only tracker, info and hf_config/."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("mp_rank_*"))
    return dst


@pytest.fixture(scope="session")
def paths(tmp_path_factory):
    """Every folder the cases name: model configs (good and bad), checkpoints (good and bad), data dirs."""
    from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path

    root = tmp_path_factory.mktemp("arguments")
    tok = build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), root / "tokenizer")
    config = _config()
    p = {"data": root / "data", "valid": root / "valid", "missing": root / "missing", "empty": root / "empty"}
    for key in ("data", "valid", "empty"):
        p[key].mkdir()

    def model_dir(name, tokenizer=True, cfg=config):
        folder = root / name
        cfg.save_pretrained(folder)
        if tokenizer:
            shutil.copytree(tok, folder, dirs_exist_ok=True)
        return folder

    p["cfg"] = model_dir("model") / "config.json"
    p["cfg_notok"] = model_dir("model_notok", tokenizer=False) / "config.json"
    p["cfg_badimage"] = model_dir("model_badimage", cfg=_config(image_token_id=FAKE - 1)) / "config.json"
    p["cfg_smallvocab"] = model_dir("model_smallvocab", cfg=_config(vocab_size=IMAGE + 1)) / "config.json"
    windowed = _config()
    windowed.text_config.sliding_window = 32  # below the --seq-length 64 of BASE: applied, not refused
    p["cfg_window"] = model_dir("model_window", cfg=windowed) / "config.json"
    windowed.text_config.sliding_window = 0
    p["cfg_badwindow"] = model_dir("model_badwindow", cfg=windowed) / "config.json"
    (root / "model_llama").mkdir()
    p["cfg_llama"] = root / "model_llama" / "config.json"
    p["cfg_llama"].write_text(json.dumps({"model_type": "llama"}))
    p["cfg_badjson"] = root / "model_badjson" / "config.json"
    shutil.copytree(p["cfg"].parent, p["cfg_badjson"].parent)
    p["cfg_badjson"].write_text("{not json")
    p["cfg_badtok"] = root / "model_badtok" / "config.json"
    shutil.copytree(p["cfg"].parent, p["cfg_badtok"].parent)
    (p["cfg_badtok"].parent / "tokenizer.json").write_text("{not json")
    p["cfg_othername"] = root / "model" / "my_config.json"
    shutil.copy(p["cfg"], p["cfg_othername"])

    hf = model_dir("hf")
    save_idefics2(hf, config)
    assert hf2mcore(hf, root / "ckpt") == 0
    p["ckpt"] = root / "ckpt"
    p["ckpt_iter"] = _light_copy(p["ckpt"], root / "ckpt_iter")
    shutil.copytree(p["ckpt_iter"] / "release", p["ckpt_iter"] / "iter_0000005")
    p["ckpt_notracker"] = _light_copy(p["ckpt"], root / "ckpt_notracker")
    (p["ckpt_notracker"] / "latest_checkpointed_iteration.txt").unlink()
    p["ckpt_noinfo"] = _light_copy(p["ckpt"], root / "ckpt_noinfo")
    (p["ckpt_noinfo"] / "release" / "checkpoint_info.json").unlink()
    p["ckpt_notok"] = _light_copy(p["ckpt"], root / "ckpt_notok")
    for name in ("tokenizer.json", "tokenizer.model"):
        (p["ckpt_notok"] / "release" / "hf_config" / name).unlink(missing_ok=True)
    return {k: str(v) for k, v in p.items()}


BASE = {"--micro-batch-size": "2", "--seq-length": "64", "--train-iters": "10", "--lr": "1e-4",
        "--data-path": "{data}", "--model-config": "{cfg}"}
FROM_CKPT = {"--model-config": None, "--load": "{ckpt}"}


def make_argv(paths, overrides=None) -> list[str]:
    """BASE with overrides: a string value (space-separated words), True (a switch) or None (dropped)."""
    out = []
    for flag, value in {**BASE, **(overrides or {})}.items():
        if value is None:
            continue
        out.append(flag)
        if value is not True:
            out += [word.format(**paths) for word in value.split()]
    return out


def validated(paths, overrides=None, world_size=1):
    args = build_parser().parse_args(make_argv(paths, overrides))
    validate_args(args, world_size)
    return args


def test_model_config_parses_with_derived_fields(paths):
    args = validated(paths, {"--tensor-model-parallel-size": "2", "--save": "{empty}/run", "--bf16": True,
                             "--sequence-parallel": True, "--no-load-optim": True, "--no-load-rng": True}, world_size=4)
    assert args.data_parallel_size == 2 and args.global_batch_size == 4 and args.num_micro_batches == 1
    assert type(args.hf_config).__name__ == "Idefics2Config" and args.hf_config.text_config.vocab_size == VOCAB
    assert args.tokenizer_dir == Path(paths["cfg"]).parent
    assert args.load_iteration is None and args.loading_release is False
    assert args.lr_decay_iters == 10 and args.image_seq_len == 4
    assert args.metrics_jsonl == str(Path(paths["empty"]) / "run" / "metrics.jsonl")
    assert args.params_dtype == torch.bfloat16 and args.accumulate_allreduce_grads_in_fp32
    assert args.sequence_parallel and args.answer_loss_only is False  # opt-in
    assert build_parser().parse_args(make_argv(paths, {"--answer-loss-only": True})).answer_loss_only


def test_sliding_window_below_the_sequence_length_is_accepted(paths):
    # Applied by the attention (window_size), so a --seq-length above it is no longer refused.
    args = validated(paths, {"--model-config": "{cfg_window}"})
    assert args.seq_length == 64 and args.hf_config.text_config.sliding_window == 32


def test_defaults_follow_megatron(paths):
    args = validated(paths, {"--model-config": "{cfg}", "--sequence-parallel": True,
                             "--global-batch-size": "8"})
    assert (args.optimizer, args.lr_decay_style, args.clip_grad, args.seed, args.max_skipped_iterations) == \
        ("adam", "linear", 1.0, 1234, 10)
    assert args.num_micro_batches == 4 and args.metrics_jsonl is None and args.eval_iters is None
    assert args.sequence_parallel is False  # TP = 1: nothing to split over
    assert args.transformer_impl == "local" and args.params_dtype == torch.float32


def test_checkpoint_parses_with_derived_fields(paths):
    args = validated(paths, {**FROM_CKPT, "--finetune": True})
    assert args.load_iteration == "release" and args.loading_release is True
    assert args.tokenizer_dir == Path(paths["ckpt"]) / "release" / "hf_config"
    assert args.hf_config.image_token_id == IMAGE
    args = validated(paths, {**FROM_CKPT, "--load": "{ckpt_iter}", "--iteration": "5"})
    assert args.load_iteration == 5 and args.loading_release is False
    assert args.tokenizer_dir == Path(paths["ckpt_iter"]) / "iter_0000005" / "hf_config"
    args = validated(paths, {**FROM_CKPT, "--skip-train": True, "--valid-data-path": "{valid}",
                             "--train-iters": None, "--lr": None, "--data-path": None, "--eval-interval": "2"})
    assert args.skip_train and args.lr_decay_iters is None


def test_parallel_options_and_frozen_components(paths):
    args = validated(paths, {"--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2",
                             "--decoder-first-pipeline-num-layers": "1", "--sequence-parallel": True, "--bf16": True,
                             "--recompute-granularity": "full", "--recompute-method": "uniform",
                             "--recompute-num-layers": "1", "--freeze-llm": True, "--freeze-perceiver": True},
                     world_size=4)
    opts = parallel_options(args)
    assert (opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, opts.decoder_first_pipeline_num_layers) == (2, 2, 1)
    assert opts.sequence_parallel and opts.params_dtype == torch.bfloat16 and opts.use_transformer_engine is False
    assert (opts.recompute_granularity, opts.recompute_method, opts.recompute_num_layers) == ("full", "uniform", 1)
    assert frozen_components(args) == {"llm", "connector"}
    assert frozen_components(validated(paths, {"--freeze-clip-vision-tower": True})) == {"vision"}
    assert (opts.use_cpu_initialization, opts.bias_fusions) == (None, None)  # decided by the device
    for fusion in ("swiglu", "gelu", "dropout"):
        opts = parallel_options(validated(paths, {"--use-cpu-initialization": True, f"--no-bias-{fusion}-fusion": True}))
        assert (opts.use_cpu_initialization, opts.bias_fusions) == (True, False)


# (id, overrides, world size, text the one-line message must contain)
BAD = [
    ("world_not_divisible", {"--tensor-model-parallel-size": "2"}, 3, "world size 3 is not divisible by --tensor-model-parallel-size"),
    # Flag-only checks come before any file is read: no model source needed to see this one.
    ("world_first", {"--tensor-model-parallel-size": "2", "--model-config": None}, 3, "world size 3 is not divisible"),
    ("global_batch", {"--global-batch-size": "6"}, 2, "--global-batch-size 6 is not divisible by --micro-batch-size x data-parallel size = 2 x 2 = 4"),
    ("tp_zero", {"--tensor-model-parallel-size": "0"}, 1, "--tensor-model-parallel-size must be >= 1"),
    ("pp_zero", {"--pipeline-model-parallel-size": "0"}, 1, "--pipeline-model-parallel-size must be >= 1"),
    ("micro_batch_zero", {"--micro-batch-size": "0"}, 1, "--micro-batch-size must be >= 1"),
    ("global_batch_zero", {"--global-batch-size": "0"}, 1, "--global-batch-size must be >= 1"),
    ("seq_length_one", {"--seq-length": "1"}, 1, "--seq-length must be >= 2"),
    ("train_iters_zero", {"--train-iters": "0"}, 1, "--train-iters must be >= 1"),
    ("save_interval_zero", {"--save-interval": "0", "--save": "{empty}"}, 1, "--save-interval must be >= 1"),
    ("log_interval_zero", {"--log-interval": "0"}, 1, "--log-interval must be >= 1"),
    ("world_size_zero", {}, 0, "WORLD_SIZE must be >= 1"),
    ("no_model_source", {"--model-config": None}, 1, "--load or --model-config is required"),
    ("both_sources", {"--load": "{ckpt}"}, 1, "--load and --model-config are exclusive"),
    ("load_missing", {**FROM_CKPT, "--load": "{missing}"}, 1, "--load {missing} does not exist"),
    ("load_empty", {**FROM_CKPT, "--load": "{empty}"}, 1, "--load {empty} holds no checkpoint"),
    ("load_no_tracker", {**FROM_CKPT, "--load": "{ckpt_notracker}"}, 1, "--load: "),
    ("load_no_info", {**FROM_CKPT, "--load": "{ckpt_noinfo}"}, 1, "--load: {ckpt_noinfo}/release/checkpoint_info.json is missing"),
    ("load_no_tokenizer", {**FROM_CKPT, "--load": "{ckpt_notok}"}, 1, "--load: {ckpt_notok}/release/hf_config holds no tokenizer"),
    ("iteration_absent", {**FROM_CKPT, "--iteration": "7"}, 1, "--iteration: the requested iteration names iteration 7"),
    ("iteration_malformed", {**FROM_CKPT, "--iteration": "latest"}, 1, "--iteration: iteration 'latest'"),
    ("iteration_without_load", {"--iteration": "5"}, 1, "--iteration needs --load"),
    ("model_config_missing", {"--model-config": "{missing}/config.json"}, 1, "--model-config {missing}/config.json does not exist"),
    ("model_config_not_idefics2", {"--model-config": "{cfg_llama}"}, 1, "--model-config: "),
    ("model_config_bad_json", {"--model-config": "{cfg_badjson}"}, 1, "--model-config: "),
    ("model_config_other_name", {"--model-config": "{cfg_othername}"}, 1, "--model-config"),
    ("model_config_no_tokenizer", {"--model-config": "{cfg_notok}"}, 1, "--model-config: "),
    ("model_config_bad_tokenizer", {"--model-config": "{cfg_badtok}"}, 1, "is not a valid tokenizer.json"),
    ("model_config_image_token", {"--model-config": "{cfg_badimage}"}, 1, "image_token_id is 31999"),
    ("model_config_vocab", {"--model-config": "{cfg_smallvocab}"}, 1, "ids up to 32002 but the model's text_config.vocab_size is 32002"),
    ("all_frozen", {"--freeze-llm": True, "--freeze-clip-vision-tower": True, "--freeze-perceiver": True}, 1,
     "nothing left to train"),
    ("tp_heads", {"--tensor-model-parallel-size": "3"}, 3, "--tensor-model-parallel-size 3 does not divide"),
    ("pp_layers", {"--pipeline-model-parallel-size": "3"}, 3, "--pipeline-model-parallel-size 3"),
    ("first_stage_needs_pp", {"--decoder-first-pipeline-num-layers": "1"}, 1,
     "--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size >= 2"),
    ("sequence_parallel_seq", {"--sequence-parallel": True, "--tensor-model-parallel-size": "2", "--seq-length": "63"}, 2,
     "--sequence-parallel needs --seq-length (63)"),
    ("save_interval_no_save", {"--save-interval": "5"}, 1, "--save-interval needs --save"),
    ("save_total_limit_zero", {"--save-total-limit": "0", "--save": "{empty}"}, 1, "--save-total-limit must be >= 1"),
    ("save_total_limit_no_save", {"--save-total-limit": "2"}, 1, "--save-total-limit needs --save"),
    ("exit_interval_zero", {"--exit-interval": "0"}, 1, "--exit-interval must be >= 1"),
    ("exit_duration_zero", {"--exit-duration-in-mins": "0"}, 1, "--exit-duration-in-mins must be > 0"),
    ("eval_interval_no_valid", {"--eval-interval": "5"}, 1, "--eval-interval needs --valid-data-path"),
    ("skip_train_no_load", {"--skip-train": True, "--valid-data-path": "{valid}"}, 1, "--skip-train needs --load"),
    ("skip_train_no_valid", {**FROM_CKPT, "--skip-train": True}, 1, "--skip-train needs --valid-data-path"),
    ("no_data_path", {"--data-path": None}, 1, "--data-path is required"),
    ("data_path_missing", {"--data-path": "{missing}"}, 1, "--data-path: shard dir"),
    ("data_path_bad_blend", {"--data-path": "0.5 {data} {valid}"}, 1, "--data-path: give either"),
    ("valid_path_missing", {"--valid-data-path": "{missing}"}, 1, "--valid-data-path: shard dir"),
    ("no_train_iters", {"--train-iters": None}, 1, "--train-iters is required"),
    ("no_lr", {"--lr": None}, 1, "--lr is required"),
    ("lr_negative", {"--lr": "-1"}, 1, "--lr must be >= 0.0"),
    ("min_lr_negative", {"--min-lr": "-1"}, 1, "--min-lr must be >= 0.0"),
    ("min_lr_above_lr", {"--min-lr": "1e-3"}, 1, "--min-lr 0.001 is above --lr 0.0001"),
    ("warmup_above_decay", {"--lr-warmup-iters": "11"}, 1, "--lr-warmup-iters 11 must be below --lr-decay-iters 10"),
    ("warmup_equal_decay", {"--lr-warmup-iters": "10"}, 1, "--lr-warmup-iters 10 must be below --lr-decay-iters 10"),
    ("warmup_negative", {"--lr-warmup-iters": "-1"}, 1, "--lr-warmup-iters must be >= 0"),
    ("clip_grad_negative", {"--clip-grad": "-0.5"}, 1, "--clip-grad must be >= 0.0"),
    ("weight_decay_negative", {"--weight-decay": "-0.1"}, 1, "--weight-decay must be >= 0.0"),
    ("adam_beta1_one", {"--adam-beta1": "1.0"}, 1, "--adam-beta1 must be in [0.0, 1.0)"),
    ("adam_beta2_negative", {"--adam-beta2": "-0.1"}, 1, "--adam-beta2 must be in [0.0, 1.0)"),
    ("adam_eps_zero", {"--adam-eps": "0"}, 1, "--adam-eps must be > 0"),
    ("sgd_momentum_one", {"--sgd-momentum": "1"}, 1, "--sgd-momentum must be in [0.0, 1.0)"),
    ("peak_tflops_zero", {"--peak-tflops": "0"}, 1, "--peak-tflops must be > 0"),
    ("bad_fraction", {"--max-bad-sample-fraction": "1.5"}, 1, "--max-bad-sample-fraction must be in [0.0, 1.0]"),
    ("max_skipped_zero", {"--max-skipped-iterations": "0"}, 1, "--max-skipped-iterations must be >= 1"),
    ("eval_iters_zero", {"--eval-iters": "0"}, 1, "--eval-iters must be >= 1"),
    ("num_workers_negative", {"--num-workers": "-1"}, 1, "--num-workers must be >= 0"),
    ("decay_iters_zero", {"--lr-decay-iters": "0", "--lr-warmup-iters": "0"}, 1, "--lr-decay-iters must be >= 1"),
    ("eval_interval_zero", {"--eval-interval": "0", "--valid-data-path": "{valid}"}, 1, "--eval-interval must be >= 1"),
    ("recompute_layers_zero", {"--recompute-granularity": "full", "--recompute-method": "block",
                               "--recompute-num-layers": "0"}, 1, "--recompute-num-layers must be >= 1"),
    ("pack_buffer_zero", {"--pack-buffer-size": "0"}, 1, "--pack-buffer-size must be >= 1"),
    ("image_size_zero", {"--image-size": "0"}, 1, "--image-size must be >= 1"),
    ("shortest_edge_zero", {"--shortest-edge": "0"}, 1, "--shortest-edge must be >= 1"),
    ("image_seq_len_zero", {"--image-seq-len": "0"}, 1, "--image-seq-len must be >= 1"),
    ("recompute_method_alone", {"--recompute-method": "uniform"}, 1, "--recompute-method needs --recompute-granularity full"),
    ("recompute_layers_selective", {"--recompute-granularity": "selective", "--recompute-num-layers": "1"}, 1,
     "--recompute-num-layers needs --recompute-granularity full"),
    ("full_recompute_no_method", {"--recompute-granularity": "full", "--recompute-num-layers": "1"}, 1,
     "--recompute-granularity full needs --recompute-method"),
    ("full_recompute_no_layers", {"--recompute-granularity": "full", "--recompute-method": "block"}, 1,
     "--recompute-granularity full needs --recompute-num-layers"),
    ("pack_with_te", {"--pack-sequences": True, "--transformer-impl": "transformer_engine"}, 1, "--pack-sequences"),
    ("finetune_no_load", {"--finetune": True}, 1, "--finetune needs --load"),
    ("image_seq_len", {"--image-seq-len": "8"}, 1, "--image-seq-len 8 differs from the model's perceiver latents (4)"),
    ("sliding_window", {"--model-config": "{cfg_badwindow}"}, 1, "text_config.sliding_window 0 must be a positive integer"),
]


@pytest.mark.parametrize("overrides,world_size,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_flags_fail_in_one_line(paths, overrides, world_size, expected):
    with pytest.raises(ArgumentError) as err:
        validated(paths, overrides, world_size)
    message = str(err.value)
    assert expected.format(**paths) in message and "\n" not in message, message
    assert re.search(r"--[a-z]|WORLD_SIZE", message), message  # names the flag to change


def test_transformer_engine_must_be_importable(paths, monkeypatch):
    # The module itself: the platform package re-exports a function under the same name.
    acc = importlib.import_module("megatron_patch.platform.accelerators")

    monkeypatch.setattr(acc, "accelerators", lambda: {"transformer_engine": False})
    with pytest.raises(ArgumentError, match="transformer_engine is not importable"):
        validated(paths, {"--transformer-impl": "transformer_engine"})
    monkeypatch.setattr(acc, "accelerators", lambda: {"transformer_engine": True})
    assert parallel_options(validated(paths, {"--transformer-impl": "transformer_engine"})).use_transformer_engine


@pytest.mark.parametrize("env,overrides,expected", [
    ("3", {"--tensor-model-parallel-size": "2"}, "world size 3 is not divisible"),
    ("two", {}, "WORLD_SIZE='two' is not an integer"),
    ("1", {"--model-config": None}, "--load or --model-config is required"),
])
def test_parse_args_exits_2_with_one_stderr_line(paths, monkeypatch, capsys, env, overrides, expected):
    monkeypatch.setenv("WORLD_SIZE", env)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(make_argv(paths, overrides))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain_megatron_idefics2: error: ") and expected in lines[0], lines


def test_parse_args_reads_world_size(paths, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args(make_argv(paths, {"--pipeline-model-parallel-size": "2"})).data_parallel_size == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert parse_args(make_argv(paths)).data_parallel_size == 1
