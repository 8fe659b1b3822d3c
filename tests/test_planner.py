"""arbd-plan (arbd/parallel/planner.py): sizes against independent counts, the activation model
against what autograd really saves, the DeepSpeed JSON against DeepSpeed's own parser, the CLI
as a subprocess (valid and refused plans), and the preflight checks (also through
launch/pretrain.py)."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from arbd.config import logical_ternary_weights, mla_layer_weights
from arbd.parallel import planner
from arbd.parallel.plan import load_plan

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "shard_plans").glob("*.yaml"))


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "arbd.parallel.planner", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd or ROOT)


def _plan_file(tmp_path, **changes):
    raw = yaml.safe_load((ROOT / "shard_plans/cpu-2.yaml").read_text())
    lay = changes.pop("layout", {})
    raw["layout"].update(lay)
    raw.update(changes)
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


# -- sizes ----------------------------------------------------------------------------------------
def test_inventory_matches_config_counts_and_splits():
    cfg = planner.training_config("arb-small")
    whole = sum(m.n for m in planner.inventory(cfg).mats)
    # arbd.config's closed-form counts plus the sidecars the text stack keeps (MemGram, LTI)
    assert whole >= sum(logical_ternary_weights(cfg).values())
    c = cfg
    h = c.n_heads
    split_mla = (c.q_lora_rank * h * (c.qk_nope_dim + c.qk_rope_dim)
                 + c.kv_lora_rank * h * (c.qk_nope_dim + c.v_head_dim) + h * c.v_head_dim * c.d_model)
    tp2 = sum(m.n for m in planner.inventory(cfg, tp=2).mats)
    assert whole - tp2 == c.n_layers * split_mla // 2
    assert c.n_layers * split_mla < c.n_layers * mla_layer_weights(c)
    ep4 = sum(m.n for m in planner.inventory(cfg, ep=4).mats)
    assert whole - ep4 == (c.n_experts - c.n_experts // 4) * 2 * c.d_model * c.expert_hidden
    cb4 = planner.inventory(cfg, cb=4)
    assert cb4.codebook_rows == -(-c.shared_vq_size // 4) + -(-c.kgvq_size // 4)
    assert cb4.kg_edge_bytes == -(-c.shared_vq_size * c.kg_edges_per_node * 4 // 4)  # one int32 slot


def test_codebook_row_bytes_is_the_real_codebooks_state():
    from arbd.vq.codebook import TernaryVQCodebook
    real = TernaryVQCodebook(1000, 64, exact_max=2000)
    inv = planner.inventory(planner.training_config("arb-tiny"))
    assert inv.codebook_row_bytes == real.state_bytes() // 1000 == 83  # 13 + 1 + 64 + 1 + 4


def test_zero_partitions_accumulators_over_dp(tmp_path):
    one = planner.estimate(load_plan(_plan_file(tmp_path, layout={"dp": 1}, zero_stage=1)))
    four = planner.estimate(load_plan(_plan_file(tmp_path, layout={"dp": 4}, zero_stage=1)))
    key = lambda e: next(v for k, v in e.rows.items() if k.startswith("int8 accumulators"))  # noqa: E731
    dense = [m for m in planner.inventory(planner.training_config("arb-tiny")).mats if m.kind == "dense"]
    part = sum(m.n + m.rows for m in dense)
    assert key(one) - key(four) == pytest.approx(part * 3 / 4, abs=1)
    assert four.comm["dp evidence reduce-scatter (all_to_all)"] > 0


def test_activation_model_against_saved_tensors():
    """What autograd really keeps after one forward (distinct storages), arb-tiny in float32."""
    cfg = planner.training_config("arb-tiny")
    torch.manual_seed(0)
    from arbd.model.arb import ARBModel
    model = ARBModel(cfg)
    b, t = 8, 60                                   # t <= kv_cache_len: the causal path GPUs take
    seen = {}

    def pack(x):
        st = x.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = model(torch.randint(0, 256, (b, t + 1)))
    est = sum(planner.activation_bytes(cfg, b, t, 4, act_steps=float(out.losses["ponder"])).values())
    real = sum(seen.values())
    assert abs(est - real) / real < 0.15, (est, real)


# -- DeepSpeed JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_deepspeed_json_batch_sizes(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    out = tmp_path / "ds.json"
    res = _cli(path, "--write-ds-config", out, "--gpu-mem-gib", 1000)
    assert res.returncode == 0, res.stderr
    ds = json.loads(out.read_text())
    lay = raw["layout"]
    assert ds["train_batch_size"] == raw["micro_batch"] * raw["grad_accum"] * lay["dp"]
    assert ds["train_micro_batch_size_per_gpu"] == raw["micro_batch"]
    assert ds["gradient_accumulation_steps"] == raw["grad_accum"]
    assert ds["zero_optimization"]["stage"] == raw["zero_stage"]
    assert ds["bf16"]["enabled"] == (raw["dtype"] == "bf16")
    assert ds["csv_monitor"] == {"enabled": True, "output_path": f"runs/{raw['name']}/monitor",
                                 "job_name": raw["name"]}
    if lay["dp"] * lay.get("tp", 1) == 1:        # DeepSpeed's own parser (world 1 without a group)
        warnings.filterwarnings("ignore")
        from deepspeed.runtime.config import DeepSpeedConfig
        c = DeepSpeedConfig(str(out))
        assert (c.train_batch_size, c.zero_optimization_stage, c.bfloat16_config.enabled) == \
            (ds["train_batch_size"], raw["zero_stage"], raw["dtype"] == "bf16")
        assert c.monitor_config.csv_monitor.enabled


# -- the CLI ------------------------------------------------------------------------------------
def test_cli_prints_table_and_comm():
    res = _cli(ROOT / "shard_plans/node-8gpu.yaml")
    assert res.returncode == 0, res.stderr
    for row in ("packed ternary weights", "int8 accumulators (1/4 per rank, ZeRO-1)", "codebook shards",
                "KG edges", "float params + Adam", "float evidence", "activations, no checkpointing",
                "activations, with checkpointing", "communication buffers", "ESTIMATED PEAK",
                "tp all-reduce of MLA output", "ep all-to-all", "codebook all-to-all",
                "dp evidence reduce-scatter", "dp packed-trit all-gather"):
        assert row in res.stdout, row
    assert "ternary evidence rate 0.75\n" in res.stdout   # node-8gpu trains arb-3b: preset_rule
    js = json.loads(_cli(ROOT / "shard_plans/node-8gpu.yaml", "--json").stdout)
    assert js["world"] == 8 and js["peak"] == max(js["phases"].values())
    assert js["rows"]["activations, with checkpointing"] < js["rows"]["activations, no checkpointing"]


def test_offload_estimate_drops_the_kept_inputs_but_one():
    """activation_offload: the recomputed regions' inputs (N x d each: 8 MLA layers, MemGram, LTI,
    the head, the scheduler and each ACT step) leave the GPU, except the one being recomputed."""
    from dataclasses import replace
    plan = replace(load_plan(ROOT / "shard_plans/h100-arb-small.yaml"), activation_offload=False)
    cfg = planner.training_config(plan)
    N, s, a = plan.micro_batch * (plan.seq_len - 1), 2, 2.5
    acts = planner.activation_bytes(cfg, plan.micro_batch, plan.seq_len, s, 1, a, 1)
    kept = planner.checkpointed_bytes(acts, cfg, plan.micro_batch, N, s, 1, a)
    off = planner.checkpointed_bytes(acts, cfg, plan.micro_batch, N, s, 1, a, offload=True)
    n_inputs = 8 + 2 + 1 + 1 + a      # layers, MemGram and LTI, head, scheduler, ACT steps
    assert kept - off == pytest.approx((n_inputs - 1) * N * cfg.d_model * s, rel=1e-6)
    est = planner.estimate(replace(plan, activation_offload=True), act_steps=a)
    assert est.rows["activations, with checkpointing and offload"] == off
    assert est.peak < planner.estimate(plan, act_steps=a).peak
    assert est.info["pinned_host_offload"] == kept - off
    text = planner.format_report(replace(plan, activation_offload=True), 1, est, 80.0)
    assert "pinned host memory (offloaded checkpoint inputs)" in text


@pytest.mark.parametrize("change, args, words", [
    (dict(layout={"tp": 3, "dp": 1}), ["--world", 3], ["layout.tp = 3", "4 attention heads"]),
    (dict(layout={"dp": 3, "ep": 3}), [], ["layout.ep = 3", "4 experts"]),
    ({}, ["--world", 3], ["does not match the world size 3", "launch 2 ranks"]),
    (dict(micro_batch=4096, seq_len=4096), ["--gpu-mem-gib", 80], ["over the GPU's 80 GiB", "lower micro_batch"]),
])
def test_cli_refuses_bad_plans(tmp_path, change, args, words):
    res = _cli(_plan_file(tmp_path, **change), *args, "--write-ds-config", tmp_path / "ds.json")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("arbd-plan: error:")
    for w in words:
        assert w in res.stderr, res.stderr
    assert not (tmp_path / "ds.json").exists()


def test_shipped_plans_fit_an_80_gib_gpu():
    for path in PLANS:
        res = _cli(path)
        assert res.returncode == 0, (path.name, res.stderr)


# -- preflight ----------------------------------------------------------------------------------
def test_preflight(tmp_path):
    plan = load_plan(ROOT / "shard_plans/cpu-2.yaml")
    planner.preflight(plan, 2, None, env={})
    planner.preflight(plan, 2, tmp_path, env={})
    with pytest.raises(planner.PlanError, match="data path .*nope does not exist"):
        planner.preflight(plan, 2, tmp_path / "nope", env={})
    with pytest.raises(planner.PlanError, match="does not fit 3 rank"):
        planner.preflight(plan, 3, None, env={})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}
    planner.preflight(plan, 2, None, env={**slurm, "SLURM_NTASKS": "2"})   # a task per rank
    planner.preflight(plan, 2, None, env={**slurm, "SLURM_NTASKS": "1"})   # a launcher per node
    with pytest.raises(planner.PlanError, match="Slurm allocation .*3 task"):
        planner.preflight(plan, 2, None, env={**slurm, "SLURM_NTASKS": "3"})


def test_pretrain_preflight_stops_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", WORLD_SIZE="2")
    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), "--plan", str(ROOT / "shard_plans/cpu-2.yaml"),
           "--out", str(tmp_path / "run")]
    res = subprocess.run(cmd + ["--data", str(tmp_path / "missing")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2 and "arbd: preflight: data path" in res.stderr, res.stderr
    env["WORLD_SIZE"] = "3"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "does not fit 3 rank(s)" in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()
