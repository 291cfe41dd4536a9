"""LoRA flags: defaults, --lora-load's settings from a peft folder, and one-line refusals."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_patch.training.arguments import ArgumentError, build_parser, validate_args

pytestmark = pytest.mark.unit

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _save_adapter(folder, layers=4, targets=TARGETS.split(","), **config):
    """A peft adapter folder: peft's own adapter_config.json (LoraConfig.save_pretrained) and weights
    under peft's key names on transformers' Idefics2 (values do not matter to validation)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    module = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}

    def peft_key(layer, target, ab):  # peft's name of an adapter tensor on transformers' Idefics2
        return f"base_model.model.model.text_model.layers.{layer}.{module.get(target, 'mlp')}.{target}.lora_{ab}.weight"

    folder.mkdir(parents=True)
    LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": r".*text_model\.layers\.\d+\..*", **config}).save_pretrained(str(folder))
    save_file({peft_key(i, t, ab): torch.zeros(2, 2) for i in range(layers) for t in targets for ab in "AB"},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from megatron_patch.testing.tiny import tiny_idefics2_config
    from megatron_patch.testing.tokenizer_files import build_idefics2_tokenizer_dir, mistral_tokenizer_model_path

    root = tmp_path_factory.mktemp("lora_arguments")
    tok = build_idefics2_tokenizer_dir(mistral_tokenizer_model_path(), root / "tokenizer")
    config = tiny_idefics2_config("mistral", image_token_id=32001, fake_image_token_id=32000)
    config.text_config.vocab_size = 32003  # the Mistral tokenizer with Idefics2's added tokens
    config.save_pretrained(root / "model")
    shutil.copytree(tok, root / "model", dirs_exist_ok=True)
    (root / "data").mkdir()
    p = {"cfg": root / "model" / "config.json", "data": root / "data", "save": root / "run",
         "adapter": _save_adapter(root / "adapter"),
         "adapter_qv": _save_adapter(root / "adapter_qv", targets=["q_proj", "v_proj"], lora_alpha=16),
         "dora": _save_adapter(root / "dora", use_dora=True),
         "rslora": _save_adapter(root / "rslora", use_rslora=True),
         "bias": _save_adapter(root / "bias", bias="all"),
         "modules_to_save": _save_adapter(root / "modules_to_save", modules_to_save=["connector"]),
         "modules_to_save_other": _save_adapter(root / "modules_to_save_other", modules_to_save=["score"]),
         "layers": _save_adapter(root / "layers", target_modules=TARGETS.split(","), layers_to_transform=[0, 1]),
         "pattern": _save_adapter(root / "pattern", rank_pattern={"q_proj": 8}),
         "pissa": _save_adapter(root / "pissa", init_lora_weights="pissa"),
         "short": _save_adapter(root / "short", layers=2)}
    vision = root / "vision"
    shutil.copytree(p["adapter"], vision)
    from safetensors.torch import save_file
    save_file({"base_model.model.model.vision_model.post_layernorm.lora_A.weight": torch.zeros(2, 2)},
              str(vision / "adapter_model.safetensors"))
    p["vision"] = vision
    return {k: str(v) for k, v in p.items()}


def _validated(paths, *flags):
    argv = ["--micro-batch-size", "1", "--seq-length", "64", "--train-iters", "2", "--lr", "1e-4",
            "--data-path", paths["data"], "--model-config", paths["cfg"],
            *[f.format(**paths) for flag in flags for f in flag.split()]]
    args = build_parser().parse_args(argv)
    validate_args(args, 1)
    return args


def test_lora_off_by_default(paths):
    assert _validated(paths).lora is None


def test_lora_rank_defaults(paths):
    lora = _validated(paths, "--lora-rank 8").lora
    assert (lora.rank, lora.alpha, lora.scale, lora.dropout) == (8, 8.0, 1.0, 0.0)
    assert ",".join(lora.targets) == TARGETS
    lora = _validated(paths, "--lora-rank 8 --lora-alpha 32 --lora-dropout 0.1 --lora-target-modules v_proj,q_proj").lora
    assert (lora.scale, lora.dropout, lora.targets) == (4.0, 0.1, ("q_proj", "v_proj"))


def test_lora_load_reads_rank_alpha_and_targets(paths):
    lora = _validated(paths, "--lora-load {adapter_qv}").lora
    assert (lora.rank, lora.alpha, lora.targets) == (4, 16.0, ("q_proj", "v_proj"))
    assert _validated(paths, "--lora-load {adapter_qv} --lora-rank 4 --lora-target-modules q_proj,v_proj").lora == lora


def test_lora_targets_beyond_the_language_model(paths):
    lora = _validated(paths, "--lora-rank 4 --lora-target-modules v_proj,vision_model,perceiver_resampler.q_proj,"
                             "modality_projection.down_proj").lora
    assert lora.targets == ("v_proj", "vision_model.q_proj", "vision_model.k_proj", "vision_model.v_proj",
                            "vision_model.out_proj", "vision_model.fc1", "vision_model.fc2", "perceiver_resampler.q_proj",
                            "modality_projection.down_proj")
    saved = _validated(paths, "--lora-rank 4 --lora-modules-to-save modality_projection,vision_model").lora
    assert saved.modules_to_save == ("vision_model", "modality_projection")  # peft's modules_to_save, in table order
    everything = _validated(paths, "--lora-rank 4 --lora-target-modules all-linear").lora.targets
    assert len(everything) == 7 + 6 + 7 + 3 and "perceiver_resampler.k_proj" in everything


@pytest.mark.parametrize("flags,expected", [
    ("--lora-rank 8 --freeze-llm", "--freeze-llm with LoRA: with LoRA the whole base model is frozen already"),
    ("--lora-rank 8 --freeze-perceiver", "--freeze-perceiver with LoRA"),
    ("--lora-rank 8 --save {save}", "--save with LoRA needs --load BASE"),
    ("--lora-rank 8 --lora-base {save}", "--lora-base is the base of a LoRA checkpoint given to --load"),
    ("--lora-rank 8 --lora-target-modules q_proj,fc1", "--lora-target-modules fc1: not a supported projection"),
    ("--lora-rank 8 --lora-target-modules vision_model.o_proj", "vision_model.o_proj: not a supported projection"),
    ("--lora-rank 0", "--lora-rank must be >= 1"),
    ("--lora-alpha 16", "--lora-alpha needs --lora-rank or --lora-load"),
    ("--lora-load {adapter} --lora-rank 8", "--lora-rank 8 disagrees with --lora-load"),
    ("--lora-load {adapter} --lora-alpha 4", "--lora-alpha 4.0 disagrees with --lora-load"),
    ("--lora-load {adapter} --lora-target-modules q_proj", "--lora-target-modules q_proj disagrees with --lora-load"),
    ("--lora-load {dora}", "DoRA (use_dora=True) is not supported"),
    ("--lora-load {rslora}", "rsLoRA"),
    ("--lora-load {bias}", "bias training (bias='all') is not supported"),
    ("--lora-load {modules_to_save}", "modules_to_save ['connector'] but adapter_model.safetensors lacks"),
    ("--lora-load {modules_to_save_other}", "modules_to_save 'score' is not supported"),
    ("--lora-rank 8 --lora-modules-to-save encoder", "--lora-modules-to-save encoder: not a supported module"),
    ("--lora-modules-to-save connector", "--lora-modules-to-save needs --lora-rank or --lora-load"),
    ("--lora-rank 8 --lora-target-modules q_proj,perceiver_resampler.q_proj --lora-modules-to-save connector",
     "perceiver_resampler.q_proj lies inside --lora-modules-to-save connector"),
    ("--lora-load {layers}", "layers_to_transform"),
    ("--lora-load {pattern}", "rank_pattern"),
    ("--lora-load {pissa}", "init_lora_weights"),
    ("--lora-load {vision}", "post_layernorm.lora_A.weight is not a LoRA A or B of a supported projection"),
    ("--lora-load {short}", "q_proj has adapters on some layers only"),
    ("--lora-load {data}", "no adapter_config.json"),
])
def test_lora_refusals_are_one_line(paths, flags, expected):
    with pytest.raises(ArgumentError) as err:
        _validated(paths, flags)
    message = str(err.value)
    assert "\n" not in message and expected in message, message


def test_peft_config_fields_are_known():
    # Every option a newer peft adds must be judged here (supported or refused), not silently ignored.
    from peft import LoraConfig

    from megatron_patch.models.idefics2 import peft_adapter

    saved = json.loads(json.dumps(LoraConfig().to_dict(), default=str))
    judged = {key for key, _, _ in peft_adapter._UNSUPPORTED} | peft_adapter.HARMLESS_FIELDS
    assert set(saved) - judged == set(), sorted(set(saved) - judged)


def test_parse_args_exits_2_with_one_line(paths, monkeypatch, capsys):
    from megatron_patch.training.arguments import parse_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--micro-batch-size", "1", "--seq-length", "64", "--train-iters", "2", "--lr", "1e-4",
            "--data-path", paths["data"], "--model-config", paths["cfg"], "--lora-rank", "8", "--save", paths["save"]]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert "--save with LoRA needs --load BASE" in lines[0]


def test_the_flop_count_knows_what_lora_trains(paths):
    # MFU: a LoRA run's base is frozen, but its adapted components (and all below them) compute input
    # gradients; counting them as fully trained would overstate the MFU by half.
    from megatron_patch.training.settings import run_settings

    logging = run_settings(_validated(paths, "--lora-rank 4")).logging
    assert (logging.frozen, logging.adapted) == ({"vision", "connector", "llm"}, {"llm"})
    logging = run_settings(_validated(paths, "--lora-rank 4 --lora-target-modules vision_model.fc1 "
                                             "--lora-modules-to-save connector")).logging
    assert (logging.frozen, logging.adapted) == ({"vision", "llm"}, {"vision"})
    logging = run_settings(_validated(paths, "--freeze-llm")).logging
    assert (logging.frozen, logging.adapted) == ({"llm"}, set())
