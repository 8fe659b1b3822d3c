"""launch/slurm/pretrain.sbatch on a real Slurm: munged, slurmctld and slurmd from Debian's
packages, started on localhost for this module (tests/slurm_cluster.py) and stopped afterwards.

The job takes the same path as on a GPU cluster (sbatch -> srun, one task per node -> torchrun
with a c10d rendezvous on the head node from `scontrol show hostnames` -> 2 ranks), only with
gloo instead of NCCL. Outside CI the module is skipped when Slurm is not installed or we are not
root; in CI (CI set) it must run, so a missing Slurm is a failure there."""
import hashlib
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from arbd.parallel.launch_utils import free_port
from slurm_cluster import DAEMONS, LocalSlurm, _alive, missing_tools

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch/slurm/pretrain.sbatch"
JOB_TIMEOUT = 240  # s; the 4-step job takes ~15 s on 2 idle cores
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
        "DEADLINE", "PREEMPTED"}


def _needs_cluster():
    problems = []
    missing = missing_tools()
    if missing:
        problems.append(f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        problems.append("not root: the local cluster runs its daemons and jobs as root")
    if problems:
        msg = "local Slurm cluster unavailable: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI must run this test (.ci/run installs Slurm)")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _needs_cluster()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        pids = {}
        for name in DAEMONS:
            pidfile = cluster.root / "run" / f"{name}.pid"
            if pidfile.exists():
                pids[name] = int(pidfile.read_text().split()[0])
        still = [n for n, pid in pids.items() if _alive(pid, n)]
        assert not still, f"daemons still running after stop: {still}"


def _job_env(tmp_path, **extra):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE",
              "ARBD_PLAN", "ARBD_DATA", "DATA_DIR", "ARBD_ROOT", "ARBD_VENV", "ARBD_RDZV_HOST"):
        env.pop(k, None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env.update(PYTHONWARNINGS="ignore", ARBD_OUT=str(tmp_path / "run"),
               CHECKPOINT_DIR=str(tmp_path / "ckpt"), ARBD_RDZV_PORT=str(free_port()), **extra)
    return env


def _submit(cluster, tmp_path, env, *args):
    """sbatch with 2 tasks on the one node; returns (job id, output file)."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--time=10", f"--output={tmp_path}/job-%j.out", str(SCRIPT), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(env, SLURM_CONF=str(cluster.conf)),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr + cluster.logs()
    job_id = res.stdout.strip().split(";")[0]
    return job_id, tmp_path / f"job-{job_id}.out"


def _wait(cluster, job_id, out_file):
    end = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < end:
        info = cluster.job(job_id)
        if info["JobState"] in DONE:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=cluster.env, timeout=10)
    text = out_file.read_text() if out_file.exists() else "<no output file>"
    pytest.fail(f"job {job_id} not done after {JOB_TIMEOUT} s ({info}):\n{text[-3000:]}{cluster.logs()}")


def test_sbatch_trains_on_two_ranks(slurm, tmp_path):
    env = _job_env(tmp_path, ARBD_STEPS="4")
    job_id, out_file = _submit(slurm, tmp_path, env, "--val-windows", "8")
    info = _wait(slurm, job_id, out_file)
    text = out_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info['JobState']} {info['ExitCode']}\n{text[-4000:]}{slurm.logs()}"
    assert info["NumTasks"] == "2" and info["NodeList"] == "localhost"

    # the script saw the allocation and rendezvoused on the head node
    port = env["ARBD_RDZV_PORT"]
    assert "1 node(s) x 2 rank(s) = 2" in text
    assert f"rdzv=localhost:{port}" in text
    assert f"CHECKPOINT_DIR={env['CHECKPOINT_DIR']} save_interval=4" in text  # from the environment
    assert "world=2 dp=2" in text, text[-3000:]

    steps = [l for l in text.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["1", "2", "3", "4"], text[-3000:]
    assert all("loss=" in l for l in steps)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    losses = [r["loss"] for r in hist]
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    logged = [float(l.split("loss=")[1].split()[0]) for l in steps]
    assert logged == pytest.approx(losses, abs=1e-4)
    assert min(losses[2:]) < losses[0], f"loss did not go down in 4 steps: {losses}"
    assert math.isfinite(hist[-1]["val_bpb"])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "monitor" / "cpu-2" / "train_loss.csv").exists()

    # the checkpoint went to CHECKPOINT_DIR (save interval defaults to the run's steps)
    ckpt = Path(env["CHECKPOINT_DIR"])
    assert (ckpt / "latest").read_text().strip() == "step-00000004", sorted(p.name for p in ckpt.iterdir())
    index = json.loads((ckpt / "step-00000004" / "index.json").read_text())
    assert index["step"] == 4 and index["world"] == 2 and index["seed"] == 0
    assert index["history"][-1]["loss"] == pytest.approx(losses[-1])
    files = index["files"]                      # every file the index lists, whole and unaltered
    assert any(n.startswith("model") for n in files) and any(n.startswith("optimizer") for n in files)
    for name, meta in files.items():
        data = (ckpt / "step-00000004" / name).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name


@pytest.mark.parametrize("extra, message", [
    pytest.param({"ARBD_PLAN": "shard_plans/cpu-4.yaml"}, "does not match the world size 2",
                 id="plan-does-not-fit-allocation"),
    pytest.param({"ARBD_PLAN": "shard_plans/no-such-plan.yaml"},
                 "plan file shard_plans/no-such-plan.yaml not found", id="missing-plan"),
    pytest.param({"DATA_DIR": "/nonexistent/arbd-data"},
                 "data path /nonexistent/arbd-data (ARBD_DATA/DATA_DIR) does not exist",
                 id="missing-data"),
])
def test_sbatch_refuses_bad_input_before_ranks_start(slurm, tmp_path, extra, message):
    env = _job_env(tmp_path, ARBD_STEPS="2", **extra)
    job_id, out_file = _submit(slurm, tmp_path, env)
    info = _wait(slurm, job_id, out_file)
    text = out_file.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text}"
    assert message in text, text
    assert "pretrain.sbatch: error:" in text
    assert "rdzv=" not in text and "step " not in text  # stopped before srun: no rank started
    assert not (tmp_path / "run").exists()


def test_sbatch_outside_slurm_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert "not inside a Slurm job: submit with sbatch" in res.stderr
