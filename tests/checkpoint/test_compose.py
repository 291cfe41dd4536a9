"""compose.py builds a loadable Idefics2 from tiny random Llama-3 style and SigLIP checkpoints."""
from __future__ import annotations

import pytest
import torch

from tests.checkpoint.cli import compose
from tests.checkpoint.fixtures import assert_bit_exact, hf_tensors, round_trip, save_llama, save_siglip

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    llama = save_llama(root / "llama")
    siglip = save_siglip(root / "siglip")
    return root, llama, siglip


def test_composed_checkpoint_keeps_both_models(sources, tmp_path):
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    root, llama, siglip = sources
    assert compose(root / "llama", root / "siglip", tmp_path / "out") == 0
    model = Idefics2ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    tokenizer = processor.tokenizer

    # image tokens added, config ids agree with the tokenizer, embeddings resized
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id >= llama.config.vocab_size
    assert model.config.text_config.vocab_size == len(tokenizer) > llama.config.vocab_size
    assert tokenizer.pad_token == "<pad>"
    prompt = processor(text="User:<image>what is in the photo<end_of_utterance>")["input_ids"][0]
    assert prompt.count(image_id) == 4

    with torch.no_grad():
        ids = torch.randint(0, llama.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        theirs = llama(input_ids=ids).logits
        ours = model(input_ids=ids).logits
        assert torch.equal(ours[..., : theirs.shape[-1]], theirs)  # the LLM is untouched
        embed = model.get_input_embeddings().weight
        assert torch.allclose(embed[image_id], llama.get_input_embeddings().weight.mean(dim=0), atol=1e-6)

        pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
        mask = torch.ones(1, 56 // 14, 56 // 14, dtype=torch.bool)
        vision = model.model.vision_model(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
        assert torch.allclose(vision, siglip(pixel_values=pixels).last_hidden_state, atol=1e-5)


def test_same_seed_same_checkpoint_other_seed_refused(sources, tmp_path, capsys):
    root, _, _ = sources
    assert compose(root / "llama", root / "siglip", tmp_path / "out", "--seed", "3") == 0
    capsys.readouterr()
    assert compose(root / "llama", root / "siglip", tmp_path / "out", "--seed", "3") == 0
    assert "[identical]" in capsys.readouterr().out
    assert compose(root / "llama", root / "siglip", tmp_path / "out", "--seed", "4") == 1
    assert "already holds a different HF checkpoint" in capsys.readouterr().err
    assert compose(root / "llama", root / "siglip", tmp_path / "out", "--seed", "4", "--overwrite") == 0


def test_tied_llama_and_full_siglip_convert_to_megatron_and_back(tmp_path):
    from megatron_patch.checkpoint.config_files import read_idefics2_config

    save_llama(tmp_path / "llama", tied=True)
    siglip = save_siglip(tmp_path / "siglip", full_model=True)
    assert compose(tmp_path / "llama", tmp_path / "siglip", tmp_path / "out") == 0
    config = read_idefics2_config(tmp_path / "out")
    # the vision tower, and only it (no pooling head, no text tower), is copied bit for bit
    tower = {k[len("vision_model."):]: v for k, v in siglip.state_dict().items()
             if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
    composed = {k[len("model.vision_model."):]: v for k, v in hf_tensors(tmp_path / "out").items()
                if k.startswith("model.vision_model.")}
    assert sorted(composed) == sorted(tower)
    for name, tensor in tower.items():
        assert torch.equal(composed[name], tensor), name
    assert config.tie_word_embeddings
    _, back = round_trip(tmp_path / "out", tmp_path, 2, 2)
    assert_bit_exact(tmp_path / "out", back, config)


def test_wrong_kind_of_source(sources, tmp_path, capsys):
    root, _, _ = sources
    assert compose(root / "siglip", root / "llama", tmp_path / "out") == 1
    assert "--llm-path" in capsys.readouterr().err
    assert compose(root / "llama", root / "llama", tmp_path / "out") == 1
    assert "--vision-path" in capsys.readouterr().err and not (tmp_path / "out").exists()
