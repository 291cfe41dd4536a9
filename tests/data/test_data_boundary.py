"""`megatron_patch.data` stands first on the path of a sample: it imports nothing from megatron-core, the
model or training (they import it, never the other way round)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_patch.data

pytestmark = pytest.mark.unit

DATA = Path(megatron_patch.data.__file__).parent
DOWNSTREAM = ("megatron.core", "megatron_patch.training", "megatron_patch.models")


def test_importing_every_data_module_loads_no_megatron_core_model_or_training():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import megatron_patch.data as data\n"
        "for m in pkgutil.iter_modules(data.__path__):\n"
        "    importlib.import_module('megatron_patch.data.' + m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert "megatron_patch.data.loader" in loaded and "megatron_patch.data.collate" in loaded
    assert [m for m in loaded if m == "megatron" or m.startswith("megatron.")] == []
    assert [m for m in loaded if m.startswith(DOWNSTREAM[1:])] == []


def test_no_data_source_names_megatron_core_model_or_training():
    """Also the imports inside functions, which the first test only sees when they run."""
    pattern = re.compile(r"^\s*(from|import)\s+(" + "|".join(re.escape(m) for m in DOWNSTREAM) + r")\b", re.M)
    found = {path.name: pattern.findall(path.read_text()) for path in sorted(DATA.glob("*.py"))}
    assert {name: hits for name, hits in found.items() if hits} == {}
