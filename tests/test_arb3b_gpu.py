"""arb-3b for real on a GPU (ARB_RUN_SLOW_TESTS=1, run on the lent machine): one forward,
backward and update at micro-batch 1. Peak memory is recorded in bench/RESULTS.md."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arbd.config import ARB_RUN_SLOW_TESTS, SEED14_TARGETS

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not (ARB_RUN_SLOW_TESTS and torch.cuda.is_available()),
                                 reason="needs ARB_RUN_SLOW_TESTS=1 and a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def test_arb3b_one_step_on_gpu(tmp_path):
    out = tmp_path / "arb3b.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench/arb3b_step.py"), "--seq-len", "64",
                          "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["applied"] and math.isfinite(r["loss"])
    for area, target in SEED14_TARGETS.items():
        assert abs(r["areas"][area] - target) <= 0.05 * target, area
    assert r["peak_step_GiB"] < 78
