"""Where one training step's time goes: torch.profiler over one arb-small step (forward, backward,
ternary update) on the GPU, after warm-up. Prints the top operators by device and by host time.

    python3 bench/profile_step.py [--preset arb-small] [--micro-batch 8] [--seq-len 1024]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.model.arb import ARBModel  # noqa: E402
from arbd.parallel import planner  # noqa: E402
from arbd.ternary.rule import TUNED_RULE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="arb-small")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if dev.type == "cuda" else "torch"
    model = ARBModel(planner.training_config(a.preset), backend=backend, seed=0, device=dev)
    model.ternary_rule = TUNED_RULE
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def step() -> None:
        ids = torch.randint(0, 256, (a.micro_batch, a.seq_len + 1), generator=g).to(dev)
        out = model(ids, dtype=dtype)
        out.loss.backward()
        model._ternary_update_memory(loss_signal=out.loss.detach())

    for _ in range(2):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    ev = prof.key_averages()
    dev_t = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    print(f"step: host {sum(e.self_cpu_time_total for e in ev) / 1e3:.1f} ms, "
          f"device {sum(dev_t(e) for e in ev) / 1e3:.1f} ms (self times, profiler on)")
    for title, key in (("by device time", dev_t), ("by host time", lambda e: e.self_cpu_time_total)):
        print(f"-- top {a.rows} {title}: name | host ms | device ms | calls")
        for e in sorted(ev, key=key, reverse=True)[:a.rows]:
            print(f"{e.key[:70]} | {e.self_cpu_time_total / 1e3:.2f} | {dev_t(e) / 1e3:.2f} | {e.count}")


if __name__ == "__main__":
    main()
