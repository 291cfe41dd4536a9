"""The parity tool through torchrun on gloo.

`--load`: a checkpoint converted at TP=2 x PP=2, run at (1,1) and (2,1), agrees with transformers on the
HF checkpoint it came from, and fails on another model. From HF weights at TP=2 x PP=2: it agrees too,
each rank read exactly its pipeline stage's tensors (checked against the files' own headers), and only
rank 0 ever imported transformers' Idefics2 modelling code (so no other rank can have built that model).
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.checkpoint.fixtures import REPO, TOOLS, idefics2_config, save_idefics2, tool
from tests.checkpoint.cli import error_line, hf2mcore

pytestmark = pytest.mark.e2e


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
    """Run the tool on tp*pp ranks (Megatron weights from `mg`, or from `hf` when mg is None);
    returns (exit code, max_abs_logit_diff or None, output)."""
    load = ["--load", str(mg), "--iteration", "release"] if mg is not None else []
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp * pp), str(PARITY),
         "--hf-path", str(hf), *load,
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


REPORT = re.compile(
    r"^rank (\d+) \(tp (\d+), pp (\d+)\): read (\d+) HF tensors, (\d+) bytes; "
    r"transformers Idefics2 modeling (imported|never imported); reference model (built|not built); peak RSS \d+ MiB$",
    flags=re.MULTILINE,
)


def stage_tensor_bytes(hf_dir) -> dict[int, dict[str, int]]:
    """{pipeline stage: {HF tensor: bytes}} for the 4-layer tied tiny model at PP=2, from the file header:
    layers 0-1, vision, connector and the embedding on stage 0; layers 2-3, the final norm and (tied)
    the embedding again, for the head, on stage 1."""
    out = {0: {}, 1: {}}
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            nbytes = torch.Size(piece.get_shape()).numel() * {"F32": 4, "BF16": 2}[piece.get_dtype()]
            layer = re.match(r"model\.text_model\.layers\.(\d+)\.", name)
            if layer:
                stages = [int(layer.group(1)) // 2]
            elif name.endswith("embed_tokens.weight"):
                stages = [0, 1]
            elif name.startswith("model.text_model.norm."):
                stages = [1]
            else:
                stages = [0]
            for stage in stages:
                out[stage][name] = nbytes
    return out


def test_hf_weights_at_tp2_pp2_each_rank_reads_its_stage_and_only_rank0_builds_the_reference(converted):
    code, diff, output = parity_cli(converted / "hf", None, 2, 2)
    assert code == 0 and diff is not None and diff < 1e-4, output
    reports = {int(m[0]): m[1:] for m in REPORT.findall(output)}
    assert sorted(reports) == [0, 1, 2, 3], output
    expected = stage_tensor_bytes(converted / "hf")
    assert 0 < sum(expected[1].values()) < sum(expected[0].values())  # the stages differ: a real split
    for rank, (tp, pp, tensors, nbytes, modeling, reference) in reports.items():
        stage = expected[int(pp)]
        assert (int(tensors), int(nbytes)) == (len(stage), sum(stage.values())), (rank, output)
        assert modeling == ("imported" if rank == 0 else "never imported"), (rank, output)
        assert reference == ("built" if rank == 0 else "not built"), (rank, output)
    assert sorted((int(r[1]), int(r[0])) for r in reports.values()) == [(0, 0), (0, 1), (1, 0), (1, 1)], output
    assert "reference model on rank 0 only" in output, output


def test_hf_checkpoint_lacking_a_tensor_is_one_error_line(converted, tmp_path, capsys):
    """Stages read different tensors, so a missing one is reported before any rank starts loading."""
    from megatron_patch.checkpoint.safetensors_io import write_safetensors

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((converted / "hf" / "config.json").read_text())
    with safe_open(str(converted / "hf" / "model.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.text_model.norm.weight"}
    write_safetensors(hf / "model.safetensors", kept, {"format": "pt"})
    assert tool("idefics2/check_hf_parity.py").main(["--hf-path", str(hf)]) == 1
    assert f"--hf-path {hf} lacks tensor model.text_model.norm.weight (1 missing)" in error_line(capsys)
