"""launch/pretrain.py under torchrun on 2 gloo ranks: DeepSpeed runs the step end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arbd.parallel.launch_utils import free_port
from arbd.parallel.plan import load_plan

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    env["PYTHONWARNINGS"] = "ignore"
    return env


def test_pretrain_two_ranks_with_deepspeed(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "launch/pretrain.py"),
           "--plan", str(ROOT / "shard_plans/cpu-2.yaml"), "--steps", "4", "--no-progress",
           "--val-windows", "8", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [l for l in res.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 4 and all("loss=" in l for l in lines)
    hist = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in hist) and math.isfinite(hist[-1]["val_bpb"])
    assert sum(r["trit_flips"] for r in hist) > 0, "the ternary update never ran"
    assert 0 < hist[-1]["kg_rows_with_edges"] <= 1 and hist[-1]["kg_edges_per_used_row"] >= 1
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "monitor" / "cpu-2" / "train_loss.csv").exists()


def test_plan_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: arb-tiny\nlayout: {dp: 2, tp: 3}\n")
    with pytest.raises(ValueError, match="tp = 3 must divide the 4 attention heads"):
        load_plan(bad)
    bad.write_text("preset: arb-huge\n")
    with pytest.raises(ValueError, match="preset must be one of"):
        load_plan(bad)
    bad.write_text("preset: arb-tiny\nmicro_batch: 0\n")
    with pytest.raises(ValueError, match="micro_batch must be a positive int"):
        load_plan(bad)
    bad.write_text("preset: arb-tiny\nactivation_offload: true\n")
    with pytest.raises(ValueError, match="set activation_checkpointing: true"):
        load_plan(bad)
    bad.write_text("preset: arb-tiny\nzero: 1\n")
    with pytest.raises(ValueError, match=r"unknown plan field\(s\) \['zero'\]"):
        load_plan(bad)
    with pytest.raises(FileNotFoundError, match="shipped plans"):
        load_plan(tmp_path / "missing.yaml")
    plan = load_plan(ROOT / "shard_plans/cpu-2.yaml")
    with pytest.raises(ValueError, match="does not match the world size 3"):
        plan.validate(3)
    ds = plan.deepspeed_config()
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2


@pytest.mark.parametrize("path", sorted((ROOT / "shard_plans").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_plan_is_valid_for_its_world(path):
    plan = load_plan(path)
    world = plan.layout.dp * plan.layout.tp
    plan.validate(world)
    assert plan.name == path.stem
    ds = plan.deepspeed_config()
    assert ds["train_batch_size"] == plan.micro_batch * plan.grad_accum * plan.layout.dp


def test_training_loop_garbage_collection_cadence(monkeypatch):
    """Automatic collection is off while training and back on after; a young-generation pass
    every `every` steps, a full one every 20 * every; every=0 leaves Python's collector alone."""
    import gc

    from arbd.train.trainer import GarbageCollection

    calls = []
    monkeypatch.setattr(gc, "collect", lambda gen=2: calls.append(gen) or 0)
    was = gc.isenabled()
    gc.enable()
    try:
        c = GarbageCollection(every=5)
        assert not gc.isenabled() and calls == [1]
        for step in range(1, 101):
            c.step(step)
        assert calls[1:] == [1] * 19 + [2]
        c.close()
        assert gc.isenabled()
        calls.clear()
        off = GarbageCollection(every=0)
        off.step(50)
        off.close()
        assert gc.isenabled() and calls == []
    finally:
        gc.enable() if was else gc.disable()


def test_plan_model_overrides(tmp_path):
    """`model:` changes ARBConfig fields on top of the preset: the planner counts them, the
    trainer builds them, and bad keys, types or launcher-owned flags are refused by name."""
    from arbd.parallel import planner

    p = tmp_path / "m.yaml"
    p.write_text("preset: arb-tiny\nmodel: {kg_edges_per_node: 24, act_max_steps: 3}\n")
    plan = load_plan(p)
    cfg = plan.model_config()
    assert (cfg.kg_edges_per_node, cfg.act_max_steps) == (24, 3)
    base = load_plan(ROOT / "shard_plans/cpu-2.yaml")
    assert base.model == {} and base.model_config().kg_edges_per_node == 8
    # the planner sizes the adjacency from the override: 16 more int32 slots per node
    more = planner.inventory(planner.training_config(plan)).kg_edge_bytes
    less = planner.inventory(planner.training_config("arb-tiny")).kg_edge_bytes
    assert more - less == cfg.shared_vq_size * 16 * 4
    p.write_text("preset: arb-tiny\nmodel:\n")
    assert load_plan(p).model == {}
    for body, words in (("{kg_edge: 4}", r"model: unknown ARBConfig field\(s\) \['kg_edge'\]"),
                        ("{kg_edges_per_node: '4'}", "kg_edges_per_node: expected a positive int"),
                        ("{kg_edges_per_node: true}", "kg_edges_per_node: expected a positive int"),
                        ("{use_vq: false}", r"may not set \['use_vq'\]; the launcher's flags"),
                        ("{n_heads: 3}", "tp = 2 must divide the 3 attention heads"),
                        ("[1, 2]", "model must be a mapping")):
        p.write_text(f"preset: arb-tiny\nlayout: {{tp: 2}}\nmodel: {body}\n")
        with pytest.raises(ValueError, match=words):
            load_plan(p)
    # floats take ints; the trainer builds what the plan says
    p.write_text("preset: arb-tiny\nmodel: {kg_edges_per_node: 4, rope_theta: 500000}\n")
    from types import SimpleNamespace

    from arbd.train.trainer import model_config
    flags = SimpleNamespace(no_vq=False, no_graph=False, no_moe=False, no_attention=False,
                            enable_output_router=False, image_weight=0.0, video_weight=0.0,
                            audio_weight=0.0)
    built = model_config(flags, load_plan(p))
    assert built.kg_edges_per_node == 4 and built.use_vq and not built.use_vision


def test_plan_rule_overrides(tmp_path):
    """`rule:` changes TernaryRule fields on top of TUNED_RULE; the trainer's rule is the plan's."""
    from dataclasses import replace

    from arbd.ternary.rule import TUNED_RULE

    p = tmp_path / "r.yaml"
    p.write_text("preset: arb-tiny\nrule: {evidence_rate: 1, learn_scales: false}\n")
    assert load_plan(p).ternary_rule() == replace(TUNED_RULE, evidence_rate=1.0, learn_scales=False)
    assert load_plan(ROOT / "shard_plans/cpu-2.yaml").ternary_rule() == TUNED_RULE
    # larger presets start from their own measured evidence rate; `rule:` still wins
    from arbd.ternary.rule import PRESET_EVIDENCE_RATES
    small = load_plan(ROOT / "shard_plans/h100-arb-small.yaml")
    assert small.ternary_rule() == replace(TUNED_RULE, evidence_rate=PRESET_EVIDENCE_RATES["arb-small"])
    assert PRESET_EVIDENCE_RATES["arb-small"] < TUNED_RULE.evidence_rate
    assert replace(small, rule={"evidence_rate": 2.5}).ternary_rule().evidence_rate == 2.5
    for body, words in (("{rate: 1}", r"rule: unknown TernaryRule field\(s\) \['rate'\]"),
                        ("{salt: 3}", r"unknown TernaryRule field\(s\) \['salt'\]"),
                        ("{threshold: 1.5}", "rule.threshold must be int"),
                        ("{learn_scales: 1}", "rule.learn_scales must be bool"),
                        ("{threshold: 500}", r"rule: threshold must be in 1..127"),
                        ("{rounding: up}", "rule: rounding must be 'nearest' or 'stochastic'")):
        p.write_text(f"preset: arb-tiny\nrule: {body}\n")
        with pytest.raises(ValueError, match=words):
            load_plan(p)


def test_loss_watch_warns_once_on_a_climbing_loss():
    from arbd.train.trainer import LossWatch

    w = LossWatch(rate=3.0)
    assert [w.check(s, l) for s, l in enumerate([7.9, 6.0, 5.1, 19.0, float("nan")], 1)] == [None] * 5
    msg = w.check(6, 20.0)                                   # 2.53x the first loss
    assert msg and "20 at step 6 is 2.5x its value at step 1 (7.9)" in msg
    assert "evidence rate (3) is likely too high" in msg and "rule: {evidence_rate: ...}" in msg
    assert w.check(7, 360.0) is None                         # once per run
    quiet = LossWatch(rate=1.0)
    assert all(quiet.check(s, 8.0 - 0.01 * s) is None for s in range(1, 200))


def test_unknown_cuda_backend_is_refused_before_anything_starts(monkeypatch):
    import torch.distributed as dist

    from arbd.train import distributed
    monkeypatch.setenv("ARBD_CUDA_BACKEND", "mpi")
    with pytest.raises(ValueError, match="ARBD_CUDA_BACKEND='mpi'.*'nccl'.*'gloo'"):
        distributed.init_distributed()
    assert not dist.is_initialized()


def test_stall_dump_prints_every_ranks_stacks_and_refuses_bad_values(monkeypatch):
    # ARBD_STALL_DUMP_S arms faulthandler's repeating dump: a process that stays inside one call
    # (as a rank blocked on a collective does) prints that call's stack on stderr.
    code = ("import time; from arbd.train.trainer import _arm_stall_dump\n"
            "def waiting_in_a_collective():\n    time.sleep(1.5)\n"
            "_arm_stall_dump(); waiting_in_a_collective()\n")
    env = dict(_env(), ARBD_STALL_DUMP_S="0.4")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("most recent call first") >= 2, res.stderr[-2000:]
    assert "waiting_in_a_collective" in res.stderr
    from arbd.train.trainer import _arm_stall_dump
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("ARBD_STALL_DUMP_S", bad)
        with pytest.raises(SystemExit, match="ARBD_STALL_DUMP_S"):
            _arm_stall_dump()
