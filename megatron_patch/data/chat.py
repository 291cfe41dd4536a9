"""Chat formatting, Idefics2 image-token expansion and tokenization with per-token targets.

Input: the canonical record's ``messages`` ([{"role", "content"}], ``<image>`` placeholders inside
the content). Output: token ids equal to what transformers' ``Idefics2Processor`` produces for the
same conversation (tests compare them), plus a boolean per token saying whether it is a training
target.

Formatting. When the tokenizer's chat template is Idefics2's own (or it has none), turns are
formatted here in Python, producing exactly what that template renders (tested against
``apply_chat_template``) without a Jinja render per sample:

    User:<image>What is this?<end_of_utterance>\\nAssistant: A cat.<end_of_utterance>\\n

(the role is capitalised; ``:`` is followed by a space unless the content starts with an image).
Any other template is rendered with ``tokenizer.apply_chat_template``; assistant turns are located
by rendering growing prefixes of the conversation.

Image tokens. Each ``<image>`` becomes ``<fake_token_around_image>`` + image_seq_len x ``<image>`` +
``<fake_token_around_image>`` (5 such blocks when images are split), adjacent fake tokens merge into
one (consecutive images and the blocks of a split image share them), and a space is inserted after
a closing fake token that is directly followed by a word -- Idefics2Processor's rules.

Targets. With ``answer_loss_only`` only assistant content and the end-of-turn token closing it
(``<end_of_utterance>``, not the newline after it) are targets; otherwise every token is. Never
targets: ``<image>`` and ``<fake_token_around_image>`` (they stand for pixels, not predictable
text) and the pad token.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from megatron_patch.data.errors import SkipSample

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
ROLES = ("system", "user", "assistant")

# The chat template saved with Idefics2 checkpoints (processor and tokenizer alike).
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_CLOSING_FAKE_BEFORE_WORD = re.compile(re.escape(FAKE_IMAGE_TOKEN) + r"(?=[^\s<])")
_PROBE = "\ue000"  # a private-use character no real answer contains


def content_parts(content: str) -> list[dict]:
    """Content string -> HF multimodal parts: [{"type": "text", "text": ...} | {"type": "image"}]."""
    parts = []
    for i, text in enumerate(content.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts or [{"type": "text", "text": ""}]


def expand_image_tokens(text: str, image_seq_len: int, crops_per_image: int = 1) -> str:
    """Replace each ``<image>`` placeholder with its token blocks, Idefics2Processor's way."""
    block = (FAKE_IMAGE_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_IMAGE_TOKEN) * crops_per_image
    text = text.replace(IMAGE_TOKEN, block).replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)
    return _CLOSING_FAKE_BEFORE_WORD.sub(FAKE_IMAGE_TOKEN + " ", text)


def check_messages(messages, sample_id: str) -> None:
    """Roles and content types the formatter understands; anything else drops the sample."""
    if not messages:
        raise SkipSample("bad_messages", f"sample {sample_id}: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SkipSample("bad_messages", f"sample {sample_id}: message {i} needs role in {ROLES} and str content")


def render_idefics2(messages, sample_id: str = "") -> tuple[str, list[tuple[int, int]]]:
    """Idefics2's chat format and the char spans [content start, end of <end_of_utterance>) of assistant turns."""
    pieces, spans, pos = [], [], 0
    for m in messages:
        content = m["content"]
        header = m["role"].capitalize() + (":" if content.startswith(IMAGE_TOKEN) else ": ")
        turn = header + content + END_OF_UTTERANCE_TOKEN + "\n"
        if m["role"] == "assistant":
            start = pos + len(header)
            spans.append((start, start + len(content) + len(END_OF_UTTERANCE_TOKEN)))
        pieces.append(turn)
        pos += len(turn)
    return "".join(pieces), spans


class TemplateRenderer:
    """Renders with ``tokenizer.apply_chat_template`` and finds assistant spans in the result."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = tokenizer.chat_template or ""
        # Multimodal templates iterate content parts; text-only ones concatenate strings.
        self.use_parts = any(k in template for k in ("['type']", '["type"]', ".type"))
        self._affixes: Optional[tuple[str, str]] = None

    def _render(self, messages) -> str:
        conv = [{"role": m["role"], "content": content_parts(m["content"]) if self.use_parts else m["content"]}
                for m in messages]
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)

    def _assistant_affixes(self) -> tuple[str, str]:
        """Header and footer the template wraps around an assistant text, learnt from a probe."""
        if self._affixes is None:
            user = {"role": "user", "content": "q"}
            before = self._render([user])
            probe = self._render([user, {"role": "assistant", "content": _PROBE}])[len(before):]
            at = probe.find(_PROBE)
            self._affixes = (probe[:at], probe[at + len(_PROBE):]) if at >= 0 else ("", "")
        return self._affixes

    def __call__(self, messages, sample_id: str) -> tuple[str, list[tuple[int, int]]]:
        spans, rendered = [], ""
        for k in range(1, len(messages) + 1):
            longer = self._render(messages[:k])
            if not longer.startswith(rendered):
                raise ValueError(
                    f"chat template of {self.tokenizer.name_or_path!r} re-renders earlier turns (sample {sample_id}); "
                    "turn spans cannot be found: use Idefics2's template or answer_loss_only=False")
            delta, base = longer[len(rendered):], len(rendered)
            if messages[k - 1]["role"] == "assistant":
                spans.append(self._locate(delta, base, messages[k - 1]["content"], sample_id))
            rendered = longer
        return rendered, spans

    def _locate(self, delta: str, base: int, content: str, sample_id: str) -> tuple[int, int]:
        header, footer = self._assistant_affixes()
        end = len(delta.rstrip())
        if header and delta.startswith(header) and delta.endswith(footer):
            return base + len(header), base + end
        needle = content.strip()
        at = delta.find(needle) if needle else end
        if at < 0:
            raise ValueError(
                f"sample {sample_id}: the chat template of {self.tokenizer.name_or_path!r} does not render the "
                "assistant content verbatim, so its tokens cannot be found; use answer_loss_only=False")
        return base + at, base + end


class ChatTokenizer:
    """Conversation -> (token ids, target flags), Idefics2Processor's ids."""

    def __init__(self, tokenizer, image_seq_len: int = 64, crops_per_image: int = 1,
                 answer_loss_only: bool = True, native_idefics2: Optional[bool] = None):
        self.tokenizer = tokenizer
        self.image_seq_len = int(image_seq_len)
        self.crops_per_image = int(crops_per_image)
        self.answer_loss_only = answer_loss_only
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} is not a fast (tokenizers) one; token offsets are needed")
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.fake_image_token_id = self._token_id(FAKE_IMAGE_TOKEN)
        self.end_of_utterance_token_id = self._token_id(END_OF_UTTERANCE_TOKEN)
        self.pad_token_id = self._pad_id(tokenizer)
        self._never_target = np.array([self.image_token_id, self.fake_image_token_id, self.pad_token_id])
        template = (tokenizer.chat_template or "").strip()
        if native_idefics2 is None:
            native_idefics2 = template in ("", IDEFICS2_CHAT_TEMPLATE.strip())
        if not native_idefics2 and not template:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template to render with")
        self.render = render_idefics2 if native_idefics2 else TemplateRenderer(tokenizer)
        self._backend = tokenizer.backend_tokenizer

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer {self.tokenizer.name_or_path!r} lacks Idefics2's {token} token; "
                             "build it with megatron_patch.testing.tokenizer_files.build_idefics2_tokenizer_dir")
        return int(tid)

    @staticmethod
    def _pad_id(tokenizer) -> int:
        # Idefics2 pads with <unk>: a real id, never produced for text. An unset or empty pad token
        # falls back to it rather than to EOS, which is a content token we train on.
        if tokenizer.pad_token and tokenizer.pad_token_id is not None:
            return int(tokenizer.pad_token_id)
        if tokenizer.unk_token_id is not None:
            return int(tokenizer.unk_token_id)
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an unk token; set pad_token")

    def encode(self, messages: Sequence[dict], sample_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
        """int64 ids (with BOS, as the processor tokenizes) and bool targets, both of length n."""
        check_messages(messages, sample_id)
        text, spans = self.render(messages, sample_id)
        # Tokenize with ONE <image> per block, then repeat it: <image> is an added special token, so
        # the tokenizer cuts the text at it and a run of them tokenizes to the same run of ids. This
        # saves the tokenizer image_seq_len-fold work on image blocks; tests pin equality with HF.
        expand = lambda s: expand_image_tokens(s, 1, self.crops_per_image)  # noqa: E731
        bos = self.tokenizer.bos_token
        enc = self._backend.encode(expand(text), add_special_tokens=not (bos and text.startswith(bos)))
        ids = np.asarray(enc.ids, dtype=np.int64)
        if self.answer_loss_only:
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            target = np.zeros(len(ids), dtype=bool)
            for start, end in spans:
                # Char positions move with the expansion; a prefix expands to a prefix of the whole.
                s, e = len(expand(text[:start])), len(expand(text[:end]))
                target |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
        else:
            target = np.ones(len(ids), dtype=bool)
        target &= ~np.isin(ids, self._never_target)
        if self.image_seq_len != 1:
            repeats = np.where(ids == self.image_token_id, self.image_seq_len, 1)
            ids, target = np.repeat(ids, repeats), np.repeat(target, repeats)
        return ids, target
