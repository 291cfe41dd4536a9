"""The checkpointer is the only training code that reads or writes a checkpoint folder: besides it and
its parts, training imports from `megatron_patch.checkpoint` only its error type, and flag validation
(which reads `--load`'s config to know the model, before anything is built)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import megatron_patch.training

pytestmark = pytest.mark.unit

TRAINING = Path(megatron_patch.training.__file__).parent
OWNERS = {"checkpointer.py", "checkpoint_parts.py"}  # save and resume
# Flag validation, before the build: --load's tracker, checkpoint_info.json and hf_config/; the LoRA
# flags' (lora.py): a LoRA checkpoint's record, and the fingerprint of the base it names.
VALIDATION = {"arguments.py", "lora.py"}
IMPORT = re.compile(r"^\s*from\s+megatron_patch\.checkpoint(\.\w+)?\s+import\s+\(?([^)\n]*(?:\n[^)]*)?)\)?", re.M)


def test_only_the_checkpointer_imports_checkpoint_io():
    found = {}
    for path in sorted(TRAINING.glob("*.py")):
        if path.name in OWNERS | VALIDATION:
            continue
        names = [n.strip() for _, group in IMPORT.findall(path.read_text()) for n in group.split(",") if n.strip()]
        other = [n for n in names if n != "CheckpointError"]
        if other:
            found[path.name] = other
    assert found == {}


def test_only_the_owners_write_checkpoint_files():
    texts = {path.name: path.read_text() for path in TRAINING.glob("*.py")}
    writers = {name for name, text in texts.items() if re.search(r"\bwrite_durable\(|\bwrite_part\(|torch\.save\(", text)}
    assert writers <= OWNERS, writers
