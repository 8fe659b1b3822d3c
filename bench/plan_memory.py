"""arbd-plan's memory estimate against the GPU's measured peak, side by side.

    python bench/plan_memory.py shard_plans/h100-arb-small.yaml shard_plans/h100-arb-3b.yaml \
        [--steps 2] [--json out.json]

For each plan: builds the model arbd-plan sizes (the trainer's text stack) on the GPU in the
plan's backend, then runs `--steps` optimizer steps the way arbd/train/trainer.py does, minus
DeepSpeed (not installed on the GPU machine): per micro-batch forward in the plan's dtype,
`record_loss`, backward, `end_micro_batch`; at the boundary `TernaryOptimizer.step()` (AdamW for
the float parameter, then the ternary update). Inputs are random bytes of the plan's shape.
Measures torch.cuda.max_memory_allocated per phase (reset between phases) and the bytes a
forward leaves allocated (the saved activations), and prints them next to the estimate, with
the ACT steps the estimate assumes (worst case) and the ones the run took (its `ponder` loss).
A probe also measures the update's temporaries per weight on one matrix (planner.UPDATE_B).
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from arbd.model.arb import ARBModel
from arbd.parallel import planner
from arbd.parallel.plan import load_plan
from arbd.ternary.rule import TUNED_RULE
from arbd.ternary.state import TernaryMatrix
from arbd.train.optim import TernaryOptimizer

GiB = 2**30
DEV = "cuda"


def _sync_peak() -> int:
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def probe_update(rows: int = 8192, cols: int = 8192) -> float:
    """Peak bytes per weight that TernaryMatrix.apply_update allocates beyond its evidence."""
    m = TernaryMatrix(rows, cols, device=DEV)
    m.add_grad(torch.randn(rows, cols, device=DEV))
    base = torch.cuda.memory_allocated()
    _sync_peak()
    m.apply_update(TUNED_RULE)
    extra = _sync_peak() - base
    del m
    return extra / (rows * cols)


def run_plan(path: str, steps: int) -> dict:
    plan = load_plan(path)
    cfg = planner.training_config(plan)
    dtype = plan.torch_dtype
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = ARBModel(cfg, backend=plan.backend, seed=0, device=DEV)
    model.ternary_rule = TUNED_RULE
    model.ternary_micro_batches = plan.grad_accum * plan.layout.dp
    model.activation_checkpointing = plan.activation_checkpointing   # as the trainer sets it
    opt = TernaryOptimizer([p for p in model.parameters() if p.requires_grad], model,
                           micro_batches=model.ternary_micro_batches)
    build_s = time.perf_counter() - t0
    persistent = torch.cuda.memory_allocated()
    _sync_peak()
    g = torch.Generator(device=DEV).manual_seed(0)
    peaks = {"first micro-batch backward": 0, "later micro-batch": 0, "update": 0}
    acts, ponder, step_s = [], [], []
    for step in range(steps):
        t1 = time.perf_counter()
        for micro in range(plan.grad_accum):
            ids = torch.randint(0, 256, (plan.micro_batch, plan.seq_len + 1), device=DEV, generator=g)
            before = torch.cuda.memory_allocated()
            out = model(ids, dtype=dtype)
            torch.cuda.synchronize()
            acts.append(torch.cuda.memory_allocated() - before)
            ponder.append(float(out.losses.get("ponder", torch.tensor(float("nan")))))
            opt.record_loss(out.loss)
            out.loss.backward()
            opt.end_micro_batch()
            del out
            key = "first micro-batch backward" if micro == 0 else "later micro-batch"
            peaks[key] = max(peaks[key], _sync_peak())
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks["update"] = max(peaks["update"], _sync_peak())
        step_s.append(time.perf_counter() - t1)
    measured_steps = sum(ponder) / len(ponder)
    worst = planner.estimate(plan)
    at_run = planner.estimate(plan, act_steps=measured_steps)
    acts_est = planner.activation_bytes(cfg, plan.micro_batch, plan.seq_len, dtype.itemsize,
                                        act_steps=measured_steps)
    res = {
        "plan": plan.name, "preset": plan.preset, "backend": plan.backend, "dtype": plan.dtype,
        "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "seq_len": plan.seq_len,
        "build_s": build_s, "step_s": step_s, "act_steps_run": measured_steps,
        "persistent_measured": persistent, "persistent_est": int(worst.info["persistent"]),
        "activations_measured_max": max(acts), "activations_est_at_run": sum(acts_est.values()),
        "activation_blocks_est": acts_est,
        "peak_measured": max(peaks.values()), "peaks_measured": peaks,
        "peak_est_worst_case": worst.peak, "phases_est_worst_case": worst.phases,
        "peak_est_at_run_steps": at_run.peak, "phases_est_at_run_steps": at_run.phases,
    }
    del model, opt
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("plans", nargs="+")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no memory numbers)")
    a = p.parse_args()
    global DEV
    DEV = a.device
    if DEV == "cpu":
        for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
            setattr(torch.cuda, name, lambda *x: None)
        for name in ("max_memory_allocated", "memory_allocated"):
            setattr(torch.cuda, name, lambda *x: 1)
        torch.cuda.get_device_name = lambda *x: "cpu"
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "update_probe_B_per_weight": probe_update(), "update_B_assumed": planner.UPDATE_B,
           "plans": []}
    for path in a.plans:
        out["plans"].append(run_plan(path, a.steps))
        print(json.dumps(out["plans"][-1], indent=1), flush=True)
    print(f"update transient: measured {out['update_probe_B_per_weight']:.1f} B/weight, "
          f"assumed {planner.UPDATE_B}")
    print("| plan | persistent meas / est (GiB) | activations meas / est (GiB) | ACT steps | "
          "peak measured (GiB) | estimate, worst-case ACT | error | estimate, run's ACT | error |")
    for r in out["plans"]:
        m = r["peak_measured"]
        print(f"| {r['plan']} | {r['persistent_measured'] / GiB:.2f} / {r['persistent_est'] / GiB:.2f} "
              f"| {r['activations_measured_max'] / GiB:.2f} / {r['activations_est_at_run'] / GiB:.2f} "
              f"| {r['act_steps_run']:.2f} | {m / GiB:.2f} | {r['peak_est_worst_case'] / GiB:.2f} "
              f"| {100 * (r['peak_est_worst_case'] - m) / m:+.1f}% | {r['peak_est_at_run_steps'] / GiB:.2f} "
              f"| {100 * (r['peak_est_at_run_steps'] - m) / m:+.1f}% |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
