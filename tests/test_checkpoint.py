"""Checkpoints: exact resume on 2 gloo ranks, a dp=2 checkpoint loaded at dp=1, atomic saves and
bad files refused before anything is touched (arbd/train/checkpoint.py)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arbd.parallel.launch_utils import free_port
from arbd.parallel.plan import load_plan
from arbd.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
PLAN2 = ROOT / "shard_plans/cpu-2.yaml"
STEPS, RESUME_AT = 4, 2
COMPARED = ("loss", "bpb", "text", "trit_flips", "val_bpb", "skipped")

# Load a checkpoint into a fresh Trainer (any world size) and save it again at the same step.
RESAVE = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch.distributed as dist
from arbd.train.trainer import Trainer, build_parser
t = Trainer(build_parser("resave").parse_args(sys.argv[1:]))
t.save(t.start_step)
dist.destroy_process_group()
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def _torchrun(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "launch/pretrain.py"), "--plan", str(PLAN2),
           "--steps", str(STEPS), "--no-progress", "--val-windows", "8", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _one_rank(tmp: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    head = ["-c", code] if code else [str(ROOT / "launch/pretrain.py")]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True,
                          env=_env(MASTER_PORT=str(free_port())), timeout=300, cwd=tmp)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with its hash: 'nothing changed' is an equality of trees."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """N=4 steps straight on 2 ranks, saving every step, keeping the last 3."""
    tmp = tmp_path_factory.mktemp("straight")
    _torchrun(tmp, "--out", str(tmp / "a"), "--save-interval", "1", "--keep-last", "3")
    return tmp / "a"


def test_keep_last_and_latest_pointer(straight):
    saves = straight / "checkpoints"
    assert [p.name for p in ck.list_checkpoints(saves)] == [ck.step_dir_name(s) for s in (2, 3, 4)]
    assert (saves / "latest").read_text().strip() == ck.step_dir_name(4)
    assert not list(saves.glob(".*tmp*")), "temporary files left behind"
    index = ck.read_index(ck.resolve("latest", saves))
    ck.verify_files(saves / ck.step_dir_name(4), index)
    assert index["step"] == 4 and index["world"] == 2 and len(index["rng"]) == 2
    assert index["loaders"]["text"]["step"] == 4 and index["optimizer_steps"] == 4
    assert set(index["files"]) == {ck.model_file(0), ck.model_file(1), ck.OPTIM_FILE,
                                   ck.runtime_file(0), ck.runtime_file(1)}
    # each rank wrote its own ZeRO row block of the accumulators; nothing was gathered
    pieces = index["tensors"]["byte_head.out.weight.t_accum"]["pieces"]
    assert [p["file"] for p in pieces] == [ck.model_file(0), ck.model_file(1)]
    assert [p["file"] for p in index["tensors"]["byte_head.out.weight.packed"]["pieces"]] == [ck.model_file(0)]
    _, _, model = ck.read_whole(saves / ck.step_dir_name(4))
    t = model["byte_head.out.weight.t_accum"]
    assert t.shape[0] == model["byte_head.out.weight.exponent"].shape[0] and t.dtype == torch.int8
    assert t.abs().sum() > 0
    opt = load_file(saves / ck.step_dir_name(4) / ck.OPTIM_FILE)
    assert set(opt) == {"logit_scale.exp_avg", "logit_scale.exp_avg_sq", "logit_scale.step"}
    assert float(opt["logit_scale.step"]) == 4.0 and float(opt["logit_scale.exp_avg_sq"].sum()) > 0


def test_exact_resume_new_process(straight, tmp_path):
    """k=2 steps (the straight run's step-2 checkpoint), then a new process runs steps 3..4."""
    res = _torchrun(tmp_path, "--out", str(tmp_path / "b"), "--save-interval", "1",
                    "--resume", str(straight / "checkpoints" / ck.step_dir_name(RESUME_AT)))
    assert "resumed from" in res.stdout and f"at step {RESUME_AT}" in res.stdout
    assert [l.split()[1] for l in res.stdout.splitlines() if l.startswith("step ")] == ["3", "4"]
    a = json.loads((straight / "history.json").read_text())
    b = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in COMPARED} == {k: rb.get(k) for k in COMPARED}, ra["step"]
    fa, fb = straight / "checkpoints" / ck.step_dir_name(4), tmp_path / "b/checkpoints" / ck.step_dir_name(4)
    names = set(ck.read_index(fa)["files"])
    assert names == set(ck.read_index(fb)["files"]) and len(names) == 5
    for name in names:
        assert (fa / name).read_bytes() == (fb / name).read_bytes(), f"{name} differs after resume"


def _plan1(tmp: Path) -> Path:
    """One rank, same global batch (16) and seq_len as cpu-2."""
    plan1 = tmp / "cpu-1.yaml"
    plan1.write_text("name: cpu-1\npreset: arb-tiny\nlayout: {dp: 1, tp: 1, ep: 1}\nzero_stage: 1\n"
                     "micro_batch: 4\ngrad_accum: 4\nseq_len: 64\ndtype: fp32\nbackend: torch\n")
    return plan1


def test_dp2_checkpoint_loads_at_dp1(straight, tmp_path):
    plan1 = _plan1(tmp_path)
    src = straight / "checkpoints" / ck.step_dir_name(4)
    res = _one_rank(tmp_path, "--plan", str(plan1), "--steps", str(STEPS), "--resume", str(src),
                    "--out", str(tmp_path / "c"), code=RESAVE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "c/checkpoints" / ck.step_dir_name(4)
    # the whole ternary state, float params and AdamW state survive dp 2 -> 1 bit for bit
    a, b = ck.read_whole(out)[2], ck.read_whole(src)[2]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert list(out.glob("model-rank*")) == [out / ck.model_file(0)]
    assert (out / ck.OPTIM_FILE).read_bytes() == (src / ck.OPTIM_FILE).read_bytes()
    i1, i2 = ck.read_index(out), ck.read_index(src)
    assert i1["world"] == 1 and i1["loaders"]["text"]["step"] == i2["loaders"]["text"]["step"] == 4
    assert i1["loaders"]["text"]["global_batch"] == 16 and i1["optimizer_steps"] == 4


# -- bad input -------------------------------------------------------------------------------
@pytest.fixture
def good(straight, tmp_path) -> tuple[Path, dict, dict]:
    """A private copy of the step-4 checkpoint, its index and model state."""
    saves = tmp_path / "saves"
    shutil.copytree(straight / "checkpoints", saves)
    ckpt = saves / ck.step_dir_name(4)
    return ckpt, ck.read_index(ckpt), ck.read_whole(ckpt)[2]


def _read(ckpt: Path, index: dict, state: dict, plan=None, config=None, seed: int = 0):
    return ck.read_checkpoint(ckpt, plan=plan or load_plan(PLAN2), config=config or index["config"],
                              seed=seed, model_state=state, rank=1, world=2)


def _refused(ckpt: Path, index: dict, state: dict, match: str, **kw) -> None:
    before = _tree(ckpt.parent)
    with pytest.raises(ck.CheckpointError, match=match):
        _read(ckpt, index, state, **kw)
    assert _tree(ckpt.parent) == before, "a refused load changed files"


def test_good_copy_reads(good):
    ckpt, index, state = good
    path, idx, tensors, floats, runtime = _read(ckpt, index, state)
    assert path == ckpt and idx["step"] == 4 and set(tensors) == set(state)
    assert "logit_scale.exp_avg" in floats and "ledger.ids" in runtime  # rank 1's own file
    assert all(f"rank1/{k}" in runtime for k in idx["rank_keys"])


def test_truncated_file(good):
    ckpt, index, state = good
    f = ckpt / ck.model_file(1)
    f.write_bytes(f.read_bytes()[:-100])
    _refused(ckpt, index, state, r"model-rank00001\.safetensors: truncated or resized: \d+ bytes")


def test_flipped_byte(good):
    ckpt, index, state = good
    f = ckpt / ck.OPTIM_FILE
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01
    f.write_bytes(bytes(raw))
    _refused(ckpt, index, state, r"optimizer\.safetensors: sha256 mismatch")


def test_missing_files(good):
    ckpt, index, state = good
    (ckpt / ck.runtime_file(1)).unlink()
    _refused(ckpt, index, state, r"runtime-rank00001\.safetensors: missing file listed in index\.json")
    (ckpt / ck.INDEX).unlink()
    _refused(ckpt, index, state, r"index\.json: missing file")
    with pytest.raises(ck.CheckpointError, match="no such checkpoint directory"):
        ck.resolve(ckpt.parent / "step-00000099")


def test_index_from_another_preset(good):
    ckpt, index, state = good
    other = dict(index, preset="arb-small")
    (ckpt / ck.INDEX).write_text(json.dumps(other))
    _refused(ckpt, other, state, r"index\.json: written for preset 'arb-small', this run uses 'arb-tiny'")
    (ckpt / ck.INDEX).write_text(json.dumps(index))
    cfg = dict(index["config"], d_model=2 * index["config"]["d_model"])
    _refused(ckpt, index, state, r"index\.json: model config differs .*'d_model'", config=cfg)


def test_incompatible_plans(good, tmp_path):
    ckpt, index, state = good
    plan = load_plan(PLAN2)
    from dataclasses import replace
    # another layout (tp 2, dp 1, same global batch) is not refused: tensors are re-cut on load
    tp2 = replace(plan, layout=replace(plan.layout, dp=1, tp=2), grad_accum=2 * plan.grad_accum)
    ck.check_compatible(ckpt, index, plan=tp2, config=index["config"], seed=0)
    _refused(ckpt, index, state, r"incompatible plan: saved seq_len=64, this run has 128",
             plan=replace(plan, seq_len=128))
    _refused(ckpt, index, state, r"incompatible plan: saved global batch=16, this run has 32",
             plan=replace(plan, micro_batch=8))
    _refused(ckpt, index, state, r"saved seed=0, this run has 7", seed=7)
    wrong = {k: v for k, v in state.items() if k != "logit_scale"}
    wrong["bogus"] = torch.zeros(1)
    _refused(ckpt, index, wrong, r"index\.json: tensors do not match the model: missing \['bogus'\], "
             r"unexpected \['logit_scale'\]")


def test_cli_refuses_corrupt_checkpoint_and_writes_nothing(good, tmp_path):
    ckpt, _, _ = good
    raw = bytearray((ckpt / ck.model_file(0)).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ckpt / ck.model_file(0)).write_bytes(bytes(raw))
    before = _tree(ckpt.parent)
    res = _one_rank(tmp_path, "--plan", str(_plan1(tmp_path)), "--steps", "6",
                    "--save-interval", "1", "--save-dir", str(ckpt.parent), "--resume", "latest",
                    "--out", str(tmp_path / "d"), "--no-progress")
    assert res.returncode != 0
    assert f"{ckpt / ck.model_file(0)}: sha256 mismatch" in res.stderr
    assert _tree(ckpt.parent) == before


# -- atomic saves ------------------------------------------------------------------------------
def _meta() -> dict:
    return {"preset": "arb-tiny", "world": 1}


def _save(root: Path, step: int, value: float, **kw) -> Path:
    return ck.save_checkpoint(root, step, model_state={"w": torch.full((3,), value)},
                              float_state={}, meta=_meta(), **kw)


def test_crash_mid_save_leaves_previous_whole(tmp_path, monkeypatch):
    root = tmp_path / "saves"
    first = _save(root, 1, 1.0)
    before = _tree(root)
    real_rename = os.rename

    def crash(src, dst):  # dies where the finished directory would be renamed into place
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 2, 2.0)
    monkeypatch.setattr(os, "rename", real_rename)
    assert ck.resolve("latest", root) == first and ck.list_checkpoints(root) == [first]
    ck.verify_files(first, ck.read_index(first))
    assert {k: v for k, v in _tree(root).items() if not k.startswith(".tmp-")} == before
    assert list(root.glob(".tmp-step-00000002-*")), "the crash should have left its temp dir"
    # the next save clears the debris, re-saving a step replaces it, keep_last prunes
    _save(root, 2, 2.0, keep_last=2)
    _save(root, 2, 3.0, keep_last=2)
    _save(root, 3, 4.0, keep_last=2)
    assert not list(root.glob(".tmp*")) and not list(root.glob(".latest*"))
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert float(load_file(root / "step-00000002" / ck.model_file(0))["w"][0]) == 3.0
    assert ck.resolve(root) == root / "step-00000003"


def test_rng_state_round_trip():
    import random

    import numpy as np
    s = json.loads(json.dumps(ck.rng_state()))
    a = (torch.rand(3), np.random.rand(2), random.random())
    ck.set_rng_state(s)
    b = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_bf16_stage0_checkpoint_saves_and_resumes(tmp_path):
    """bf16 without ZeRO (the h100-arb-small layout): DeepSpeed trains the float parameters through
    fp32 master copies (FP16_UnfusedOptimizer here, the bf16 optimizer on GPUs) and saves them in
    bf16. Saving used to fail on the masters' AdamW state, resuming on the bf16 dtype."""
    plan = tmp_path / "cpu-bf16.yaml"
    plan.write_text("name: cpu-bf16\npreset: arb-tiny\nlayout: {dp: 1, tp: 1, ep: 1}\nzero_stage: 0\n"
                    "micro_batch: 4\ngrad_accum: 2\nseq_len: 64\ndtype: bf16\nbackend: torch\n")
    common = ["--plan", str(plan), "--steps", "4", "--no-progress", "--val-windows", "4",
              "--save-interval", "2"]
    a = _one_rank(tmp_path, *common, "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    src = tmp_path / "a/checkpoints" / ck.step_dir_name(2)
    floats = load_file(str(src / ck.OPTIM_FILE))
    assert {"logit_scale.exp_avg", "logit_scale.exp_avg_sq", "logit_scale.step"} <= set(floats)
    assert floats["logit_scale.exp_avg"].abs().sum() > 0 and float(floats["logit_scale.step"]) == 2
    b = _one_rank(tmp_path, *common, "--out", str(tmp_path / "b"), "--resume", str(src))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    assert "resumed from" in b.stdout and "at step 2" in b.stdout
    la = {r["step"]: r["loss"] for r in json.loads((tmp_path / "a/history.json").read_text())}
    lb = {r["step"]: r["loss"] for r in json.loads((tmp_path / "b/history.json").read_text())}
    assert sorted(lb) == [1, 2, 3, 4] and lb[1] == la[1] and lb[2] == la[2]
    # Steps after the resume: the fp32 master of the one float parameter restarts from its bf16
    # copy, so agreement is close, not bitwise.
    for s in (3, 4):
        assert abs(lb[s] - la[s]) <= 1e-2 * abs(la[s]), (s, la[s], lb[s])
