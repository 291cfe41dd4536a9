"""The GPU checks' parity script runs end to end here (on CPU), so a session lent a GPU spends its
minutes on the GPU's figures, not on fixing the script."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.training.fixtures import REPO

pytestmark = pytest.mark.e2e


def test_gpu_parity_script_passes_on_this_machine(tmp_path):
    out = tmp_path / "parity.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.parity", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = {(c["check"], c["dtype"]): c for c in result["checks"]}
    assert len(checks) == 14 and all(c["ok"] for c in checks.values())
    for dtype in ("fp32", "bf16"):
        grads = checks[("loss and grads llama", dtype)]
        assert grads["grad_tensors"] > 50 and grads["worst_grad_error"] > 0  # compared, not skipped
        assert checks[("packed rows = one per row", dtype)]["logit_std"] > 0.1
    # bf16 is really bf16: its errors are far above fp32's
    assert checks[("forward mistral", "bf16")]["logits"] > 10 * checks[("forward mistral", "fp32")]["logits"]
