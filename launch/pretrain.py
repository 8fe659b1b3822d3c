"""Pretraining entry point.

    deepspeed --num_gpus 8 launch/pretrain.py --plan shard_plans/<plan>.yaml
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --plan shard_plans/cpu-2.yaml
    mpirun -np 2 python launch/pretrain.py --plan shard_plans/cpu-2.yaml

Before anything starts (no process group, no model) every rank runs the planner's preflight:
a missing data path, a plan that does not fit the world size, or a Slurm allocation that does
not match the plan ends the run with one clear line and exit status 2.
"""
import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from arbd.parallel.plan import load_plan  # noqa: E402
from arbd.parallel.planner import PlanError, preflight  # noqa: E402


def _world_size() -> int:
    # torchrun / deepspeed set WORLD_SIZE; mpirun sets OMPI_COMM_WORLD_SIZE (the trainer maps it).
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


def check_before_start(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--plan", default="shard_plans/cpu-2.yaml")
    p.add_argument("--preset", default=None)
    p.add_argument("--data", default=None)
    a, _ = p.parse_known_args(argv)
    try:
        plan = load_plan(a.plan)
        if a.preset:
            plan = replace(plan, preset=a.preset)
        preflight(plan, _world_size(), a.data)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"arbd: preflight: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    check_before_start()
    from arbd.train.trainer import main
    raise SystemExit(main(description="arbd pretraining (all modalities, full ARB stack)"))
