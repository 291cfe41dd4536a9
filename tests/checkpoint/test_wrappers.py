"""The shell wrappers print their usage when called wrong and run the tools when called right."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.checkpoint.fixtures import TOOLS, idefics2_config, save_idefics2

pytestmark = pytest.mark.unit


WRAPPERS = ["idefics2/model_convertor.sh", "idefics2/mg2hf.sh", "idefics2_llama3/model_convertor.sh"]


def bash(script, *args, env=None):
    return subprocess.run(
        ["bash", str(TOOLS / script), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("script", WRAPPERS)
@pytest.mark.parametrize("args", [(), ("only-one",), ("a", "b", "two", "2", "x", "y", "z", "w")])
def test_usage_on_wrong_calls(script, args):
    result = bash(script, *args)
    assert result.returncode == 2 and result.stderr.startswith("usage: "), result.stderr


def test_wrappers_convert_both_ways(tmp_path):
    save_idefics2(tmp_path / "hf", idefics2_config("llama"))
    result = bash("idefics2/model_convertor.sh", tmp_path / "hf", tmp_path / "mg", 2, 2, 1)
    assert result.returncode == 0, result.stderr
    assert "hf2mcore: read 101 tensors" in result.stdout
    result = bash("idefics2/mg2hf.sh", tmp_path / "mg", tmp_path / "back", "release")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()


def test_llama3_wrapper_composes_then_converts(tmp_path):
    """Argument plumbing only (PYTHON is a stub that logs its calls): compose, then hf2mcore on its output."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$(basename "$1") ${{*:2}}" >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub)}
    result = bash("idefics2_llama3/model_convertor.sh", "L", "S", "OUT", "MG", 2, 4, 2, "--perceiver-latents", 64, env=env)
    assert result.returncode == 0, result.stderr
    compose, convert = log.read_text().splitlines()
    assert compose == "compose.py --llm-path L --vision-path S --save-path OUT --perceiver-latents 64"
    assert convert == (
        "hf2mcore.py --load-path OUT --save-path MG --target-tensor-model-parallel-size 2 "
        "--target-pipeline-model-parallel-size 4 --target-decoder-first-pipeline-num-layers 2"
    )
