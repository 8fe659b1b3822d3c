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
