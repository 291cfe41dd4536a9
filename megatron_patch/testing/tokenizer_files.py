"""Build an Idefics2 tokenizer folder offline from a sentencepiece model (tests, examples, tiny models).

Idefics2 = the Mistral-7B sentencepiece vocabulary (32000 pieces) + three added special tokens,
in this order so their ids match the released model:

    <fake_token_around_image> = 32000, <image> = 32001, <end_of_utterance> = 32002

The pad token is ``<unk>`` (id 0), as in the released Idefics2 tokenizer: it is a real vocabulary
entry, never produced for text (the vocabulary has byte fallback, so every input maps to real
pieces), and distinct from every content and special token we train on. The folder also carries
Idefics2's chat template, and loads with ``AutoTokenizer.from_pretrained(out_dir)``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megatron_patch.data.chat import (
    END_OF_UTTERANCE_TOKEN,
    FAKE_IMAGE_TOKEN,
    IDEFICS2_CHAT_TEMPLATE,
    IMAGE_TOKEN,
)

IDEFICS2_ADDED_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)
PAD_TOKEN = "<unk>"


def mistral_tokenizer_model_path() -> Path:
    """The Mistral-7B-v0.1 sentencepiece file shipped inside the ``mistral-common`` package."""
    try:
        import mistral_common
    except ImportError:
        raise ImportError("mistral-common is not installed; `pip install mistral-common` (it ships the tokenizer file)") from None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mistral-common; reinstall mistral-common>=1.5")
    return path


def build_idefics2_tokenizer_dir(sp_model_path, out_dir, chat_template: Optional[str] = None) -> Path:
    """Save a tokenizer folder: ``sp_model_path`` + Idefics2's added tokens, pad token and chat template.

    ``chat_template=None`` uses Idefics2's template; pass "" to save no template (the encoder then
    formats turns in Idefics2's way itself).
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    sp_model_path, out_dir = Path(sp_model_path), Path(out_dir)
    if not sp_model_path.is_file():
        raise FileNotFoundError(f"sentencepiece model {sp_model_path} does not exist")
    with tempfile.TemporaryDirectory() as staging:
        # transformers finds the sentencepiece file only under its canonical name.
        shutil.copyfile(sp_model_path, Path(staging) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True, add_eos_token=False, legacy=False)
    base_size = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS2_ADDED_TOKENS)})
    ids = tokenizer.convert_tokens_to_ids(list(IDEFICS2_ADDED_TOKENS))
    if ids != list(range(base_size, base_size + 3)):
        raise ValueError(f"{sp_model_path}: Idefics2 tokens got ids {ids}; expected {base_size}..{base_size + 2}")
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = IDEFICS2_CHAT_TEMPLATE if chat_template is None else (chat_template or None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    _record_special_token_flags(out_dir / "tokenizer_config.json")

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if reloaded.pad_token != PAD_TOKEN or reloaded("a")["input_ids"][0] != reloaded.bos_token_id:
        raise RuntimeError(f"tokenizer saved to {out_dir} does not reload with pad={PAD_TOKEN} and a leading BOS")
    return out_dir


def _record_special_token_flags(config_path: Path) -> None:
    """Write the BOS/EOS flags into tokenizer_config.json too (tokenizer.json already applies them)
    so a reader of the folder sees Mistral's convention: BOS added, EOS not."""
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=True, add_eos_token=False, legacy=False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
