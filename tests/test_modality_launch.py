"""launch/audio.py, vision.py and diffusion.py: one trainer, only their modality's components."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arbd.config import get_preset
from arbd.model.arb import ARBModel
from arbd.ternary import ternary_matrices

ROOT = Path(__file__).resolve().parents[1]
PLAN = """name: one
preset: arb-tiny
layout: {dp: 1, tp: 1, ep: 1}
micro_batch: 2
grad_accum: 1
seq_len: 32
"""


@pytest.mark.parametrize("script, key", [("audio", "audio"), ("vision", "image"), ("diffusion", "video")])
def test_modality_entry_point_trains_its_modality_only(tmp_path, script, key):
    plan = tmp_path / "one.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".venv" / "torch_extensions"))
    res = subprocess.run([sys.executable, str(ROOT / f"launch/{script}.py"), "--plan", str(plan),
                          "--steps", "3", "--no-progress", "--no-save", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 3 and all(math.isfinite(r[key]) and math.isfinite(r["loss"]) for r in hist)
    assert all("bpb" not in r and "text" not in r for r in hist)   # no text forward at all
    assert sum(r["trit_flips"] for r in hist) > 0
    # Only this modality's parts are built: no VQ, KG, attention or router weights.
    line = next(l for l in res.stdout.splitlines() if l.startswith("arbd: plan="))
    weights = int(line.split("ternary_weights=")[1].split()[0].replace(",", ""))
    full = ARBModel(get_preset("arb-tiny"), device="meta")
    skipped = sum(m.rows * m.cols for n, m in ternary_matrices(full)
                  if n.split(".")[0] in ("shared_vq", "composite", "layers", "router"))
    assert weights <= sum(m.rows * m.cols for _, m in ternary_matrices(full)) - skipped, line
