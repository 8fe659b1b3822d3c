"""Elastic restart under `torchrun --max-restarts 1` with a real SIGKILL of one rank, mid-run and
mid-save: the restart resumes from the last finished checkpoint (`--resume auto`) and the loss
curve goes on exactly as in an uninterrupted run (the reference, run first)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arbd.parallel.launch_utils import free_port
from arbd.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMPARED = ("loss", "bpb", "text", "trit_flips", "val_bpb", "skipped")


def _torchrun(tmp: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
              restarts: int = 0) -> subprocess.CompletedProcess:
    # c10d rendezvous, and its store not shared with the workers: with the static rendezvous
    # (--master-port) or the shared store, torch 2.13 hands the restarted workers the previous
    # attempt's gloo addresses and they never connect (pytorch/pytorch#135712; seen here).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", tmp.name,
           str(ROOT / "launch/pretrain.py"), "--plan", str(ROOT / "shard_plans/cpu-2.yaml"),
           "--steps", str(STEPS), "--no-progress", "--val-windows", "8", "--out", str(out),
           "--save-interval", "2", "--resume", "auto", *extra]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                **(env or {})}
    full_env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600, cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _curve(out: Path) -> list[dict]:
    return [{k: r.get(k) for k in ("step", *COMPARED)}
            for r in json.loads((out / "history.json").read_text())]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    res = _torchrun(tmp, tmp / "a")
    assert "resumed from" not in res.stdout  # 'auto' with no checkpoint yet: a fresh start
    return tmp / "a"


def _killed_run(tmp: Path, knob: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, mark = tmp / "b", tmp / "killed.mark"
    res = _torchrun(tmp, out, *extra, env={"ARBD_TEST_KILL": knob, "ARBD_TEST_KILL_MARK": str(mark)},
                    restarts=1)
    assert mark.read_text().strip() == knob, "the kill never fired"
    return res, out, mark


def test_rank_killed_mid_run_restarts_and_resumes(straight, tmp_path):
    # rank 1 dies in step 5's first forward; the step-4 checkpoint is the last finished one
    res, out, _ = _killed_run(tmp_path, "step:5:1")
    log = res.stdout + res.stderr
    assert "resumed from" in log and f"{ck.step_dir_name(4)} at step 4" in log
    assert [int(l.split()[1]) for l in res.stdout.splitlines() if l.startswith("step ")] == \
        [1, 2, 3, 4, 5, 6]  # step 5 was never logged before the kill; 5, 6 after the restart
    curve = _curve(out)
    assert [r["step"] for r in curve] == list(range(1, STEPS + 1))
    assert curve == _curve(straight)  # the loss curve continues exactly
    saves = out / "checkpoints"
    assert ck.resolve("latest", saves).name == ck.step_dir_name(STEPS)


def test_rank_sigkilled_mid_save_previous_checkpoint_survives(straight, tmp_path):
    # rank 1 dies inside the step-4 save (its shard written, its manifest not), with async saves
    res, out, _ = _killed_run(tmp_path, "save:4:1", "--async-save")
    log = res.stdout + res.stderr
    assert f"{ck.step_dir_name(2)} at step 2" in log, log[-3000:]  # step 4 was never published
    curve = _curve(out)
    assert [r["step"] for r in curve] == list(range(1, STEPS + 1))
    assert curve == _curve(straight)  # async saving and the restart change nothing
    saves = out / "checkpoints"
    assert not list(saves.glob(".tmp-*")), "the crashed save's debris was not cleaned"
    assert [p.name for p in ck.list_checkpoints(saves)] == [ck.step_dir_name(s) for s in (2, 4, 6)]
    for p in ck.list_checkpoints(saves):
        ck.verify_files(p, ck.read_index(p))
