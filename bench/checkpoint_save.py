"""Step-time cost of checkpoint saving: synchronous vs asynchronous (CheckpointWriter), CPU.

A stand-in training step (float matmuls for about --step-ms) mutates a ternary-like state of
--mb MB (int8 accumulators + uint8 packed trits, in 1 MB tensors) and saves every --every steps.
Reported per mode: mean step time with the save call included, the longest time the training
thread was blocked in a save, and the slowdown against no saving. The background thread shares
the CPU with the step here; on a GPU run the step would run on the device while the thread writes.

    python bench/checkpoint_save.py --mb 256 --steps 24 --every 4
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time

import torch

from arbd.train.checkpoint import CheckpointWriter


def run(mode: str, args: argparse.Namespace, root: str) -> dict:
    torch.manual_seed(0)
    n = args.mb
    state = {f"m{i}.t_accum": torch.zeros(1024, 512, dtype=torch.int8) for i in range(n // 2)}
    state.update({f"m{i}.packed": torch.zeros(1024, 512, dtype=torch.uint8) for i in range(n - n // 2)})
    a = torch.randn(args.dim, args.dim)
    writer = CheckpointWriter(async_save=mode == "async")
    steps, blocked = [], []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        for _ in range(args.matmuls):
            a = torch.tanh(a @ a) * 0.5
        for v in list(state.values())[:8]:  # training changes the state between saves
            v.add_(1)
        if mode != "none" and step % args.every == 0:
            s0 = time.perf_counter()
            writer.save(root, step, model_state=state, float_state={}, meta={"world": 1},
                        keep_last=2)
            if mode == "sync":
                writer.wait()
            blocked.append(time.perf_counter() - s0)
        steps.append(time.perf_counter() - t0)
    s0 = time.perf_counter()
    writer.wait()  # the exit waits for the last save
    tail = time.perf_counter() - s0
    return {"mode": mode, "step_ms": 1e3 * sum(steps) / len(steps),
            "max_blocked_ms": 1e3 * max(blocked, default=0.0), "exit_wait_ms": 1e3 * tail}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=256, help="state size in MB")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--matmuls", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = []
    for mode in ("none", "sync", "async"):
        root = tempfile.mkdtemp(prefix="ckbench-", dir=args.dir)
        try:
            out.append(run(mode, args, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    base = out[0]["step_ms"]
    for r in out:
        r["vs_no_save"] = r["step_ms"] / base
    print(json.dumps({"machine": platform.processor() or platform.machine(), "args": vars(args),
                      "results": out}, indent=1))


if __name__ == "__main__":
    main()
