"""Training quality of plan variants side by side: the same pretraining run (launch/pretrain.py,
same data and seed) under a base plan and under copies of it with some fields changed.

    python bench/quality_ab.py --plan shard_plans/h100-arb-small.yaml --steps 200 \\
        --variant base --variant seed1 seed=1 --variant bf16-evidence evidence_dtype=bf16 \\
        --variant kg32 model.kg_edges_per_node=32

A variant is a name and `field=value` changes: plan fields, `model.<ARBConfig field>` and
`rule.<TernaryRule field>` (the plan's `model:` / `rule:` overrides), `seed` or `warmup`. Values are YAML scalars. Each run is its own process; the
table compares held-out bits per byte at the end, the train loss over the last fifth of the
steps, tokens/s and how full the KG adjacency got. A variant that only changes the seed gives
the run-to-run spread against which the other differences should be read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


RUN_KEYS = ("seed", "warmup")   # launcher arguments rather than plan fields


def variant_plan(base: dict, changes: list[str]) -> tuple[dict, dict]:
    plan, run = json.loads(json.dumps(base)), {}
    for ch in changes:
        key, sep, raw = ch.partition("=")
        if not sep:
            raise SystemExit(f"quality_ab: a change is field=value, got {ch!r}")
        value = yaml.safe_load(raw)
        section, dot, sub = key.partition(".")
        if key in RUN_KEYS:
            run[key] = int(value)
        elif dot and section in ("model", "rule"):
            plan.setdefault(section, {})[sub] = value
        else:
            plan[key] = value
    return plan, run


def run_variant(name: str, plan: dict, seed: int, warmup: int, a: argparse.Namespace, out: Path) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    plan_file = d / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(dict(plan, name=f"{plan['name']}-{name}"), sort_keys=False))
    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), "--plan", str(plan_file),
           "--steps", str(a.steps), "--seed", str(seed), "--warmup-steps", str(warmup),
           "--val-windows", str(a.val_windows), "--eval-interval", str(a.eval_interval),
           "--no-save", "--no-progress", "--log-interval", str(a.log_interval), "--out", str(d)]
    t0 = time.time()
    with open(d / "log.txt", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                timeout=max(1.0, a.deadline - time.time())).returncode
        except subprocess.TimeoutExpired:
            rc = 124   # past --budget-s; its log keeps the steps it logged
    if rc != 0:
        return {"variant": name, "rc": rc, "log": str(d / "log.txt")}
    hist = json.loads((d / "history.json").read_text())
    tail = hist[-max(1, len(hist) // 5):]
    last = hist[-1]
    return {"variant": name, "rc": 0, "seed": seed, "warmup": warmup, "wall_s": round(time.time() - t0, 1),
            "val_bpb": last["val_bpb"], "max_loss": max(r["loss"] for r in hist),
            "max_loss_step": max(hist, key=lambda r: r["loss"])["step"],
            "flips": sum(r["trit_flips"] for r in hist), "tail_loss": statistics.fmean(r["loss"] for r in tail),
            "val_curve": [(r["step"], r["val_bpb"]) for r in hist if "val_bpb" in r],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in hist[len(hist) // 2:]),
            **{k: last[k] for k in ("kg_rows_with_edges", "kg_rows_full", "kg_edges_per_used_row")
               if k in last}}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r.get("rc") == 0), None)
    out = ["| variant | seed | val bpb | vs first | train loss, last fifth | max train loss (step) | trit flips | tokens/s | KG rows with edges | full | edges per used row |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("rc") != 0:
            out.append(f"| {r['variant']} | failed (rc {r['rc']}, {r['log']}) | | | | | | | | | |")
            continue
        out.append(f"| {r['variant']} | {r['seed']} | {r['val_bpb']:.4f} | {r['val_bpb'] - base['val_bpb']:+.4f} | "
                   f"{r['tail_loss']:.4f} | {r['max_loss']:.2f} ({r['max_loss_step']}) | {r['flips']:,} | "
                   f"{r['tokens_per_s']:,.0f} | "
                   f"{r.get('kg_rows_with_edges', float('nan')):.4f} | {r.get('kg_rows_full', float('nan')):.4f} | "
                   f"{r.get('kg_edges_per_used_row', float('nan')):.2f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [field=value ...]")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=3600, help="all runs together; a run still "
                   "going when it is spent is stopped and reported as failed")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/quality_ab"))
    a = p.parse_args()
    a.deadline = time.time() + a.budget_s
    base = yaml.safe_load(Path(a.plan).read_text())
    base.setdefault("name", Path(a.plan).stem)
    out = Path(a.out)
    rows = []
    for name, *changes in a.variant:
        plan, run = variant_plan(base, changes)
        rows.append(run_variant(name, plan, run.get("seed", a.seed), run.get("warmup", a.warmup_steps), a, out))
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["rc"] == 124:
            break
    (out / "quality_ab.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
