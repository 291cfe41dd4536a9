"""The parity tool's `--load`: a checkpoint converted at TP=2 x PP=2, run at (1,1) and (2,1) through
torchrun, agrees with transformers on the HF checkpoint it came from, and fails on another model."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.checkpoint.fixtures import REPO, TOOLS, idefics2_config, save_idefics2, tool
from tests.checkpoint.cli import error_line, hf2mcore

PARITY = TOOLS / "idefics2" / "check_hf_parity.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """hf/ converted at (2,2) into mg22/; other/ has the same config and other weights."""
    root = tmp_path_factory.mktemp("parity")
    save_idefics2(root / "hf", idefics2_config("llama", tied=True), seed=3)
    save_idefics2(root / "other", idefics2_config("llama", tied=True), seed=4)
    assert hf2mcore(root / "hf", root / "mg22", 2, 2) == 0
    return root


def parity_cli(hf, mg, tp, pp):
    """Run the tool on tp*pp ranks; returns (exit code, max_abs_logit_diff or None, output)."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp * pp), str(PARITY),
         "--hf-path", str(hf), "--load", str(mg), "--iteration", "release",
         "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    found = re.findall(r"^max_abs_logit_diff=(\S+)$", result.stdout, flags=re.MULTILINE)
    return result.returncode, float(found[-1]) if found else None, result.stdout + result.stderr


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_tp2_pp2_checkpoint_matches_transformers_at_other_layouts(converted, tp, pp):
    code, diff, output = parity_cli(converted / "hf", converted / "mg22", tp, pp)
    assert code == 0 and diff is not None and diff < 1e-4, output


def test_checkpoint_of_other_weights_fails(converted):
    code, diff, output = parity_cli(converted / "other", converted / "mg22", 1, 1)
    assert code == 1 and diff is not None and diff > 1e-2, output


def test_unusable_load_is_one_error_line(converted, tmp_path, capsys):
    """Checked before any process group starts, so main() runs here in-process."""
    parity = tool("idefics2/check_hf_parity.py")
    assert parity.main(["--hf-path", str(converted / "hf"), "--load", str(tmp_path / "none")]) == 1
    assert f"checkpoint directory {tmp_path / 'none'} does not exist" in error_line(capsys)

    save_idefics2(tmp_path / "mistral", idefics2_config("mistral"))
    assert parity.main(["--hf-path", str(tmp_path / "mistral"), "--load", str(converted / "mg22")]) == 1
    assert "describe different models: tensor lm_head.weight is absent in --load, (101, 48) in --hf-path" in error_line(capsys)
