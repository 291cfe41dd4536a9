"""Chat format, token ids (vs transformers' Idefics2Processor) and label masking."""

import numpy as np
import pytest
import torch

from megatron_patch.data.chat import (
    IDEFICS2_CHAT_TEMPLATE,
    ChatTokenizer,
    render_idefics2,
)
from megatron_patch.data.encoder import SampleEncoder, shift_and_truncate
from megatron_patch.data.errors import SkipSample
from megatron_patch.data.image_processing import ImageProcessingConfig
from tests.data.encoder_fixtures import conversation, hf_parts, hf_processor, make_image, tokenizer, tokenizer_dir

pytestmark = pytest.mark.unit


FAKE, IMAGE, EOU, PAD = 32000, 32001, 32002, 0

CONVERSATIONS = [
    [("user", "<image>What is this?"), ("assistant", "A cat.")],
    [("system", "Answer briefly."), ("user", "Compare <image> and<image>\nplease"),
     ("assistant", "The left one<image>is brighter."), ("user", "Why?"), ("assistant", "")],
    [("user", "<image><image>"), ("assistant", "<image> Two images, both of 3 dogs (ok)!")],
    [("user", "No image here, just text\twith  spaces ."), ("assistant", "Fine:\n- one\n- two")],
]


def test_tokenizer_folder():
    tok = tokenizer()
    assert len(tok) == 32003
    assert tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [FAKE, IMAGE, EOU]
    assert tok.pad_token == "<unk>" and tok.pad_token_id == PAD
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id == 1
    assert tok.chat_template == IDEFICS2_CHAT_TEMPLATE


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_python_format_equals_chat_template(turns):
    messages = conversation(*turns)["messages"]
    assert render_idefics2(messages)[0] == tokenizer().apply_chat_template(hf_parts(messages), tokenize=False)


@pytest.mark.parametrize("splitting", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("native", [True, False], ids=["python-format", "jinja-template"])
@pytest.mark.parametrize("turns", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_ids_equal_idefics2_processor(turns, native, splitting):
    record = conversation(*turns)
    n_images = sum(m["content"].count("<image>") for m in record["messages"])
    images = [make_image(30 + 7 * i, 20, seed=i) for i in range(n_images)]
    config = ImageProcessingConfig(longest_edge=32, image_splitting=splitting)
    processor = hf_processor(config, image_seq_len=64)
    text = processor.apply_chat_template(hf_parts(record["messages"]), tokenize=False)
    expected = processor(text=[text], images=images or None)["input_ids"][0]

    chat = ChatTokenizer(tokenizer(), 64, config.crops_per_image, native_idefics2=native)
    ids, _ = chat.encode(record["messages"])
    assert ids.tolist() == list(expected)


def _targets(turns, answer_loss_only=True, image_seq_len=2):
    chat = ChatTokenizer(tokenizer(), image_seq_len, answer_loss_only=answer_loss_only)
    ids, target = chat.encode(conversation(*turns)["messages"])
    return ids, target, tokenizer().convert_ids_to_tokens(ids.tolist())


def test_answer_only_masking_is_exact():
    turns = [("user", "<image>What is this?"), ("assistant", "A cat."), ("user", "Sure?"),
             ("assistant", "Yes, <image> it is.")]
    ids, target, pieces = _targets(turns)
    trained = [p for p, t in zip(pieces, target) if t]
    # Assistant content and its <end_of_utterance>; not "Assistant:", not the newline, not images.
    assert trained == ["▁A", "▁cat", ".", "<end_of_utterance>", "▁Yes", ",", "▁", "▁it", "▁is", ".", "<end_of_utterance>"]


def test_template_path_masks_like_python_path():
    turns = CONVERSATIONS[1]
    messages = conversation(*turns)["messages"]
    fast = ChatTokenizer(tokenizer(), 3, native_idefics2=True).encode(messages)
    slow = ChatTokenizer(tokenizer(), 3, native_idefics2=False).encode(messages)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])


def test_other_chat_template_masks_assistant_turns(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}{% endfor %}")
    chat = ChatTokenizer(tok, 2)
    ids, target = chat.encode(conversation(("user", "Hi <image>"), ("assistant", "Hello there"),
                                           ("user", "Bye"), ("assistant", "ssistant"))["messages"])
    trained = [p for p, t in zip(tok.convert_ids_to_tokens(ids.tolist()), target) if t]
    assert trained == ["Hello", "▁there", "</s>", "ss", "istant", "</s>"]


def test_all_text_counts_without_answer_only():
    ids, target, pieces = _targets(CONVERSATIONS[1], answer_loss_only=False)
    never = np.isin(ids, [FAKE, IMAGE, PAD])
    assert never.any() and not target[never].any()
    assert target[~never].all()


@pytest.mark.parametrize("answer_only", [True, False])
def test_images_and_pad_never_count(answer_only):
    encoder = SampleEncoder(tokenizer_dir(), seq_length=64, answer_loss_only=answer_only, image_seq_len=4,
                            longest_edge=32)
    record = conversation(("user", "<image>x"), ("assistant", "y <image><unk> z"))
    sample = encoder.encode(record, [make_image(40, 30), make_image(10, 30, seed=1)])
    labels, loss_mask = sample["labels"], sample["loss_mask"]
    assert loss_mask.dtype == torch.float32
    assert (loss_mask[torch.isin(labels, torch.tensor([FAKE, IMAGE, PAD]))] == 0).all()
    assert (labels == PAD).any()  # the literal "<unk>" in the text is the pad id, and is not trained on


def test_labels_are_shifted_megatron_style():
    encoder = SampleEncoder(tokenizer_dir(), seq_length=128, image_seq_len=4, longest_edge=32)
    record = conversation(("user", "<image>Say hi"), ("assistant", "Hi!"))
    ids, target = encoder.chat.encode(record["messages"])
    sample = encoder.encode(record, [make_image(20, 20)])
    assert torch.equal(sample["tokens"], torch.from_numpy(ids[:-1]))
    assert torch.equal(sample["labels"], torch.from_numpy(ids[1:]))
    assert torch.equal(sample["loss_mask"], torch.from_numpy(target[1:].astype(np.float32)))
    assert torch.equal(sample["position_ids"], torch.arange(len(ids) - 1))
    assert sample["num_images"] == len(sample["pixel_values"]) == 1


def test_no_trainable_tokens_is_skipped():
    encoder = SampleEncoder(tokenizer_dir(), seq_length=64, image_seq_len=4)
    with pytest.raises(SkipSample) as err:
        encoder.encode(conversation(("system", "s"), ("user", "only a question")), [])
    assert err.value.reason == "no_trainable_tokens"


def test_too_long_text_is_truncated():
    encoder = SampleEncoder(tokenizer_dir(), seq_length=40, image_seq_len=4, longest_edge=32)
    record = conversation(("user", "<image>Count."), ("assistant", " ".join(str(i) for i in range(100))))
    full_ids, _ = encoder.chat.encode(record["messages"])
    sample = encoder.encode(record, [make_image(20, 20)])
    assert len(full_ids) > 41 and len(sample["tokens"]) == 40
    assert torch.equal(sample["tokens"], torch.from_numpy(full_ids[:40]))
    assert torch.equal(sample["labels"], torch.from_numpy(full_ids[1:41]))
    assert sample["loss_mask"].sum() > 0


def test_cut_through_image_is_skipped():
    encoder = SampleEncoder(tokenizer_dir(), seq_length=40, image_seq_len=4, longest_edge=32)
    record = conversation(("user", "word " * 40 + "<image>"), ("assistant", "ok"))
    with pytest.raises(SkipSample) as err:
        encoder.encode(record, [make_image(20, 20)])
    assert err.value.reason == "too_long_image_cut"


@pytest.mark.parametrize("fake_at,ok", [(4, True), (5, False), (7, False)])
def test_truncation_rule_at_the_boundary(fake_at, ok):
    """seq_length=5: tokens ids[:5], labels ids[1:6]; a fake token as the last label is a cut too."""
    ids = np.arange(100, 110)
    ids[fake_at] = FAKE
    target = np.ones(10, dtype=bool)
    if ok:
        tokens, labels, loss_mask = shift_and_truncate(ids, target, 5, [FAKE, IMAGE], "t")
        assert tokens.tolist() == ids[:5].tolist() and labels.tolist() == ids[1:6].tolist()
    else:
        with pytest.raises(SkipSample, match="too_long_image_cut"):
            shift_and_truncate(ids, target, 5, [FAKE, IMAGE], "t")


def test_bad_records_are_skipped_with_reason():
    encoder = SampleEncoder(tokenizer_dir(), seq_length=64, image_seq_len=4)
    with pytest.raises(SkipSample, match="image_count_mismatch") as err:
        encoder.encode(conversation(("user", "<image><image>"), ("assistant", "a"), sample_id="rec-7"), [make_image(8, 8)])
    assert "rec-7" in str(err.value)
    with pytest.raises(SkipSample, match="bad_messages"):
        encoder.encode(conversation(("robot", "hi"), ("assistant", "a")), [])


def test_settings_come_from_the_model_folder(tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tokenizer_dir(), folder)
    config = ImageProcessingConfig(longest_edge=48, shortest_edge=20, image_splitting=True)
    hf_processor(config, image_seq_len=5).save_pretrained(folder)
    assert json.loads((folder / "processor_config.json").read_text())["image_seq_len"] == 5
    encoder = SampleEncoder(folder, seq_length=256)
    assert encoder.image_config == config and encoder.image_seq_len == 5
    assert SampleEncoder(folder, seq_length=256, longest_edge=64, image_seq_len=3).image_config.longest_edge == 64


def test_flags_build_the_encoder():
    import argparse

    from megatron_patch.data.encoder import add_encoder_arguments, encoder_from_settings
    from megatron_patch.data.loader import add_data_arguments
    from megatron_patch.training.settings import data_settings

    args = add_encoder_arguments(add_data_arguments(argparse.ArgumentParser())).parse_args(
        ["--image-size", "224", "--shortest-edge", "30", "--image-splitting", "--no-answer-loss-only",
         "--image-seq-len", "8"])
    args.seq_length, args.micro_batch_size, args.seed = 128, 1, 1234
    encoder = encoder_from_settings(data_settings(args), tokenizer_dir())
    assert encoder.image_config.longest_edge == 224 and encoder.image_config.image_splitting
    assert encoder.image_config.shortest_edge == 30
    assert encoder.image_seq_len == 8 and not encoder.chat.answer_loss_only and encoder.seq_length == 128


@pytest.mark.parametrize("pad", ["", None], ids=["empty", "unset"])
def test_empty_or_unset_pad_token_falls_back_to_unk(pad):
    """Never the empty string, and never EOS (a content token we train on): Idefics2's <unk>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.pad_token = pad
    chat = ChatTokenizer(tok, 2)
    assert chat.pad_token_id == tok.unk_token_id == PAD and chat.pad_token_id != tok.eos_token_id
    ids, target = chat.encode(conversation(("user", "x"), ("assistant", "y <unk>"))["messages"])
    assert (ids == PAD).any() and not target[ids == PAD].any()


def test_pad_id_decision():
    from types import SimpleNamespace as Tok

    # An empty pad token is ignored even when an id comes with it (here EOS's).
    assert ChatTokenizer._pad_id(Tok(pad_token="", pad_token_id=2, unk_token_id=0)) == 0
    assert ChatTokenizer._pad_id(Tok(pad_token="<pad>", pad_token_id=7, unk_token_id=0)) == 7
    with pytest.raises(ValueError, match="set pad_token"):
        ChatTokenizer._pad_id(Tok(pad_token=None, pad_token_id=None, unk_token_id=None, name_or_path="t"))
