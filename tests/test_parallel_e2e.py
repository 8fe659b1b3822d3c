"""End to end: launch/pretrain.py on 4 gloo ranks with tp = 2, ep = 2, dp = 2 and the codebooks
and KG edges row-sharded over all 4, against one rank accumulating the same micro-batches.

The arb-tiny full text stack (VQ, KG edges, MoEGraph, MLA with HCA, composite head) trains for
20 steps in float64 under DeepSpeed (ZeRO-1 over dp); the 4-rank run also recomputes its MLA
layers and MoEGraph in backward (activation checkpointing), collectives included. Required: the loss falls; the logged
losses equal the one-rank run's (1e-9); and the final checkpoints, each assembled whole from its
per-rank shard files, hold the same ternary state bit for bit (packed trits, exponents,
accumulators, codebook usage, KG edges).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from arbd.parallel.launch_utils import free_port
from arbd.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
PLAN = """name: {name}
preset: arb-tiny
layout: {{dp: {dp}, tp: {tp}, ep: {ep}, codebook_shards: 0}}
zero_stage: 1
micro_batch: 2
grad_accum: {accum}
seq_len: 32
dtype: fp64
backend: torch
evidence: {evidence}
activation_checkpointing: {ck}
"""


def _run(tmp_path: Path, name: str, nproc: int, *, steps: int = STEPS, resume: Path | None = None,
         evidence: str = "summed", **layout) -> tuple[list[dict], dict]:
    plan = tmp_path / f"{name}.yaml"
    plan.write_text(PLAN.format(name=name, ck=str(name == "par").lower(), evidence=evidence, **layout))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(ROOT / "launch/pretrain.py"), "--plan", str(plan),
           "--steps", str(steps), "--save-interval", str(steps), "--no-progress",
           "--val-windows", "4", "--eval-interval", "0", "--out", str(out), "--save-dir", str(out / "ckpt")]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".venv" / "torch_extensions"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    hist = json.loads((out / "history.json").read_text())
    _, index, state = ckpt.read_whole("latest", out / "ckpt")
    return hist, state


def test_tp2_ep2_dp2_sharded_codebooks_equal_one_rank(tmp_path):
    par_hist, par_state = _run(tmp_path, "par", 4, dp=2, tp=2, ep=2, accum=2)
    one_hist, one_state = _run(tmp_path, "one", 1, dp=1, tp=1, ep=1, accum=4)
    par_loss = [r["loss"] for r in par_hist]
    one_loss = [r["loss"] for r in one_hist]
    assert len(par_loss) == len(one_loss) == STEPS
    assert sum(par_loss[-5:]) / 5 < sum(par_loss[:5]) / 5 - 0.5, f"the loss did not fall: {par_loss}"
    torch.testing.assert_close(torch.tensor(par_loss), torch.tensor(one_loss), rtol=1e-9, atol=1e-9)
    assert sum(r["trit_flips"] for r in par_hist) > 0
    # Logged counts are the whole model's (other ranks' experts and rows included).
    assert [r["trit_flips"] for r in par_hist] == [r["trit_flips"] for r in one_hist]
    ternary = [k for k in one_state if k.endswith(("packed", "exponent", "t_accum", "e_accum"))]
    assert any(".experts." in k for k in ternary) and any("codebook" in k for k in ternary)
    exact = [k for k in one_state if torch.is_tensor(one_state[k])
             and not one_state[k].is_floating_point()]
    assert len(exact) > 100   # every ternary buffer, usage counters, KG edges, the step counter
    differ = [k for k in exact if not torch.equal(par_state[k], one_state[k])]
    assert not differ, f"state differs from the one-rank run: {differ[:10]}"
    # The float32 parameter (logit_scale) averages its gradient over dp in another order.
    for k in set(one_state) - set(exact):
        torch.testing.assert_close(par_state[k], one_state[k], rtol=1e-6, atol=1e-9)

    # Resharding in the real trainer: the tp2 ep2 dp2 checkpoint resumes at W = 1 and at W = 2
    # (tp 1, ep 2) and trains on exactly like the one-rank run's own checkpoint does. (Steps are
    # 22 for all resumed runs, so their schedules agree; the float32 logit_scale is the one
    # float difference between the two checkpoints, hence the tolerance.)
    more = dict(steps=STEPS + 2)
    for label, nproc, layout in (("w1", 1, dict(dp=1, tp=1, ep=1, accum=4)),
                                 ("w2", 2, dict(dp=2, tp=1, ep=2, accum=2))):
        a, a_state = _run(tmp_path, f"from_par_{label}", nproc, resume=tmp_path / "par" / "ckpt",
                          **more, **layout)
        b, b_state = _run(tmp_path, f"from_one_{label}", nproc, resume=tmp_path / "one" / "ckpt",
                          **more, **layout)
        assert [r["step"] for r in a][-2:] == [STEPS + 1, STEPS + 2]
        torch.testing.assert_close(torch.tensor([r["loss"] for r in a[-2:]]),
                                   torch.tensor([r["loss"] for r in b[-2:]]), rtol=1e-6, atol=1e-6)
        assert abs(a[-1]["loss"] - one_loss[-1]) < 2.0   # continues the curve, no restart
        moved = [k for k in exact if not torch.equal(a_state[k], one_state[k])]
        assert moved, "the resumed steps changed nothing"


def test_votes_plan_on_two_ranks_equals_one_rank_voting_per_micro_batch(tmp_path):
    """`evidence: votes` holds on one rank too (each micro-batch votes on its own), so dp = 2
    with one micro-batch each ends in the one-rank run's state bit for bit, and neither equals
    the summed-evidence run (the plan's mode is not ignored at W = 1)."""
    two, two_state = _run(tmp_path, "vtwo", 2, steps=4, evidence="votes", dp=2, tp=1, ep=1, accum=1)
    one, one_state = _run(tmp_path, "vone", 1, steps=4, evidence="votes", dp=1, tp=1, ep=1, accum=2)
    summed, summed_state = _run(tmp_path, "sone", 1, steps=4, dp=1, tp=1, ep=1, accum=2)
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["trit_flips"] for r in two] == [r["trit_flips"] for r in one]
    exact = [k for k in one_state if torch.is_tensor(one_state[k]) and not one_state[k].is_floating_point()]
    assert not [k for k in exact if not torch.equal(two_state[k], one_state[k])]
    assert [k for k in exact if not torch.equal(summed_state[k], one_state[k])]
