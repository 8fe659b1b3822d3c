"""The install and launch files users rely on: setup.cfg, the set-up script, the Dockerfile."""
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean_and_installs_through_setup_script():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert "scripts/setup.sh" in text, "the image must install the same way CI does"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: scripts/setup.sh installs it with the test extras")
    res = subprocess.run([hadolint, "--failure-threshold", "warning", str(ROOT / "docker/Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_pip_call_in_setup_script_pins_torch():
    lines = [l for l in (ROOT / "scripts/setup.sh").read_text().splitlines()
             if "$PIP install" in l and not l.strip().startswith("#")]
    assert lines
    for line in lines:
        assert "-c \"$CONSTRAINTS\"" in line, line
    constraints = (ROOT / "scripts/constraints.txt").read_text()
    assert "torch==2.13.0" in constraints


def test_setup_cfg_declares_entry_points_that_import():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entries = [l.strip() for l in cfg["options.entry_points"]["console_scripts"].splitlines() if l.strip()]
    assert entries
    for entry in entries:
        name, target = (p.strip() for p in entry.split("="))
        module, func = target.split(":")
        mod = __import__(module, fromlist=[func])
        assert callable(getattr(mod, func)), entry


# -- docker/run.sh and docker/compose.yaml (no Docker engine here: syntax, the command the script
# would run, and the compose file's mounts) ------------------------------------------------------
def _run_sh(*args, **env):
    full = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("ARBD_", "NCCL_"))}
    full.update(env)
    return subprocess.run(["bash", str(ROOT / "docker/run.sh"), *args], capture_output=True, text=True,
                          env=full, timeout=30, cwd=ROOT)


def test_run_sh_parses_and_builds_the_launch_command(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "docker/run.sh")]).returncode == 0
    data = tmp_path / "bytes.bin"
    data.write_bytes(b"x" * 100)
    res = _run_sh("--dry-run", "--val-windows", "8", ARBD_UID="1000:1000", ARBD_GPUS="8",
                  ARBD_DATA=str(data), CHECKPOINT_DIR=str(tmp_path / "ck"), ARBD_OUT=str(tmp_path / "out"),
                  ARBD_PLAN="shard_plans/node-8gpu.yaml", ARBD_SEED="7", NCCL_SOCKET_IFNAME="ib0")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert cmd[:2] == ["docker", "run"] and cmd[cmd.index("--user") + 1] == "1000:1000"
    assert f"{data}:/data:ro" in cmd and f"{tmp_path / 'ck'}:/checkpoints" in cmd
    assert f"{tmp_path / 'out'}:/runs" in cmd and "NCCL_SOCKET_IFNAME" in cmd
    tail = cmd[cmd.index("arbd") + 1:]
    assert tail[:3] == ["deepspeed", "--num_gpus", "8"]
    for flag, value in (("--plan", "shard_plans/node-8gpu.yaml"), ("--seed", "7"), ("--data", "/data"),
                        ("--save-dir", "/checkpoints"), ("--out", "/runs"), ("--val-windows", "8")):
        assert tail[tail.index(flag) + 1] == value, flag
    assert not (tmp_path / "ck").exists()           # a dry run creates nothing


def test_run_sh_refuses_root_and_missing_data(tmp_path):
    res = _run_sh("--dry-run", ARBD_UID="0:0", ARBD_GPUS="0")
    assert res.returncode == 2 and "as root" in res.stderr
    res = _run_sh("--dry-run", ARBD_UID="1000:1000", ARBD_GPUS="0", ARBD_DATA=str(tmp_path / "none"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_compose_mounts_data_and_checkpoints_as_non_root():
    import yaml
    doc = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    svc = doc["services"]["arbd"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert set(mounts) == {"/data", "/checkpoints", "/runs"}
    assert mounts["/data"]["read_only"] is True and not mounts["/checkpoints"].get("read_only")
    assert "${CHECKPOINT_DIR" in mounts["/checkpoints"]["source"] and "${ARBD_DATA" in mounts["/data"]["source"]
    assert svc["user"] == "${ARBD_UID:-1000:1000}"   # uid 1000 unless told; never root by default
    for key in ("ARBD_PLAN", "ARBD_SEED", "ARBD_STEPS", "NCCL_DEBUG"):
        assert key in svc["environment"]
    cmd = " ".join(svc["command"])
    for part in ("launch/pretrain.py", "--data /data", "--save-dir /checkpoints", "--seed $$ARBD_SEED"):
        assert part in cmd
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfile_cuda_base_and_non_root_user():
    text = (ROOT / "docker/Dockerfile").read_text()
    base = next(l.split()[1] for l in text.splitlines() if l.startswith("FROM "))
    assert base.startswith("nvidia/cuda:") and ":latest" not in base and "-ubuntu" in base
    assert "download.pytorch.org/whl/cu" in text               # the CUDA build of torch
    users = [l.split()[1] for l in text.splitlines() if l.startswith("USER ")]
    assert users and all(not u.startswith(("root", "0")) for u in users)
