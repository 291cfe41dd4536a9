"""Input formats (LLaVA, ShareGPT) -> one canonical record.

Accepted inputs
---------------
LLaVA::

    {"id": "x", "image": "rel/a.jpg" | ["a.jpg", "b.jpg"],
     "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}

ShareGPT::

    {"id": "x" (optional), "images": ["a.jpg", ...] (optional),
     "messages"|"conversations": [{"role"|"from": "user"|"assistant"|"system",
                                   "content"|"value": str | [{"type": "text", "text": ..} | {"type": "image"}]}]}

Roles ``human``/``user`` map to ``user``; ``gpt``/``assistant`` to ``assistant``.
Text-only records (no image key, or an empty list) are valid.

Canonical record (what the shard builder stores as ``KEY.json`` and the encoder receives)
-------------------------------------------------------------------------------------------
::

    {"id": str,
     "images": [str, ...],   # relative paths, normalised posix, in placeholder order
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

* Every image is referenced by exactly one ``<image>`` placeholder in the content text;
  the i-th placeholder (reading messages in order) is ``images[i]``. The training
  loader hands the encoder ``record["messages"]`` plus the decoded PIL images in that order.
* LLaVA convention: a record that has images but no ``<image>`` placeholder at all gets
  ``"<image>\\n" * len(images)`` prepended to its first user turn.
* Roles: an optional leading ``system`` message, then ``user`` / ``assistant`` strictly
  alternating, starting with ``user``; at least one non-empty ``assistant`` turn.
* The canonical record is itself valid ShareGPT input, so converting it again is a no-op.

Problem kinds (stable names, used as counters in reports and by ``validate_record``)
----------------------------------------------------------------------------------
``malformed_record``, ``empty_conversation``, ``wrong_role``, ``image_path_outside_folder``,
``too_many_images``, ``image_count_mismatch`` (listed in priority order: a record with several
problems is reported under the first one). The shard builder adds ``missing_image`` and
``undecodable_image``, which need the image folder.
"""
from __future__ import annotations

import posixpath
from typing import Any, Iterable

IMAGE_TOKEN = "<image>"
FORMATS = ("llava", "sharegpt")

MALFORMED = "malformed_record"
EMPTY = "empty_conversation"
WRONG_ROLE = "wrong_role"
PATH_ESCAPE = "image_path_outside_folder"
TOO_MANY = "too_many_images"
COUNT_MISMATCH = "image_count_mismatch"
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
# Priority order: a record with several problems is skipped under the first.
PROBLEM_KINDS = (MALFORMED, EMPTY, WRONG_ROLE, PATH_ESCAPE, TOO_MANY, COUNT_MISMATCH,
                 MISSING_IMAGE, UNDECODABLE_IMAGE)

_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system"}


class RecordError(ValueError):
    """A record cannot be converted; ``problems`` lists the kinds found (priority order)."""

    def __init__(self, problems: list[str], record_id: str = ""):
        self.problems = problems
        super().__init__(f"record {record_id or '?'}: {', '.join(problems)}")


def detect_format(record: Any) -> str | None:
    """Return ``"llava"``, ``"sharegpt"`` or None when the record fits neither shape."""
    if not isinstance(record, dict):
        return None
    if "image" in record and "images" not in record:
        return "llava"
    if "messages" in record or "images" in record:
        return "sharegpt"
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return "llava" if "from" in turns[0] and "value" in turns[0] else "sharegpt"
    if isinstance(turns, list):
        return "llava"
    return None


def record_id(record: Any, index: int | None = None) -> str:
    """Best-effort printable id (used in reports even for malformed records)."""
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) \
            and not isinstance(record.get("id"), bool):
        return str(record["id"])
    return f"#{index}" if index is not None else "?"


def _content_text(content: Any) -> str | None:
    """Content as text; OpenAI-style part lists become text with ``<image>`` for image parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                return None
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif part.get("type") in ("image", "image_url"):
                parts.append(IMAGE_TOKEN)
            else:
                return None
        return "".join(parts)
    return None


def _raw_images(record: dict, fmt: str) -> list | None:
    value = record.get("image") if fmt == "llava" else record.get("images")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _safe_relpath(path: str) -> str | None:
    """Normalised relative posix path, or None when it is empty, absolute or escapes via '..'."""
    if not path or "\x00" in path:
        return None
    path = path.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return None
    norm = posixpath.normpath(path)
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


def _parse(record: Any, fmt: str | None):
    """Shared parsing; returns (fmt, id-or-None, messages-or-None, images-or-None)."""
    fmt = fmt or detect_format(record)
    if fmt is None or not isinstance(record, dict):
        return fmt, None, None, None
    if fmt == "llava":
        turns, role_key, text_key = record.get("conversations"), ("from",), ("value",)
    else:
        turns = record.get("messages", record.get("conversations"))
        role_key, text_key = ("role", "from"), ("content", "value")
    if not isinstance(turns, list):
        return fmt, None, None, None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return fmt, None, None, None
        role = next((turn[k] for k in role_key if k in turn), None)
        text = _content_text(next((turn[k] for k in text_key if k in turn), None))
        if not isinstance(role, str) or text is None:
            return fmt, None, None, None
        messages.append({"role": role, "content": text})
    rid = record.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        return fmt, None, None, None
    return fmt, rid, messages, _raw_images(record, fmt)


def _role_problem(messages: list[dict]) -> bool:
    """True when roles are unknown, or not [system] user/assistant alternating from user."""
    roles = [_ROLE_MAP.get(m["role"].lower()) for m in messages]
    if None in roles:
        return True
    if roles and roles[0] == "system":
        roles = roles[1:]
    expected = ("user", "assistant")
    return any(role != expected[i % 2] for i, role in enumerate(roles))


def validate_record(record: Any, fmt: str | None = None, max_image_num: int = 5) -> list[str]:
    """Problem kinds of ``record`` in priority order (empty list: valid).

    ``fmt`` forces a format ("llava"/"sharegpt"); None detects it per record.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    fmt, _, messages, images = _parse(record, fmt)
    if messages is None or images is None:
        return [MALFORMED]
    problems = []
    has_answer = any(_ROLE_MAP.get(m["role"].lower()) == "assistant" and m["content"].strip()
                     for m in messages)
    if not any(m["content"].strip() for m in messages):
        problems.append(EMPTY)
    elif _role_problem(messages):
        problems.append(WRONG_ROLE)
    elif not has_answer:
        problems.append(EMPTY)  # nothing to learn from: no assistant text
    if any(_safe_relpath(p) is None for p in images):
        problems.append(PATH_ESCAPE)
    if len(images) > max_image_num:
        problems.append(TOO_MANY)
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placeholders and placeholders != len(images):
        problems.append(COUNT_MISMATCH)
    return problems


def to_canonical(record: Any, fmt: str | None = None, index: int | None = None,
                 max_image_num: int = 5) -> dict:
    """Convert a valid record to the canonical form; raises ``RecordError`` otherwise.

    ``index`` (position in the input file) names records that carry no ``id``.
    """
    problems = validate_record(record, fmt, max_image_num)
    if problems:
        raise RecordError(problems, record_id(record, index))
    _, rid, messages, images = _parse(record, fmt)
    messages = [{"role": _ROLE_MAP[m["role"].lower()], "content": m["content"]} for m in messages]
    images = [_safe_relpath(p) for p in images]
    if images and not any(IMAGE_TOKEN in m["content"] for m in messages):
        # LLaVA convention: images without placeholders precede the first user text.
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(images) + first_user["content"]
    rid = str(rid) if rid is not None else f"sample-{index if index is not None else 0}"
    return {"id": rid, "images": images, "messages": messages}


def count_placeholders(messages: Iterable[dict]) -> int:
    """Number of ``<image>`` placeholders over all message contents."""
    return sum(m["content"].count(IMAGE_TOKEN) for m in messages)
