"""One forward/backward/update of the full arb-3b ARBModel at micro-batch 1 on a GPU.

    python bench/arb3b_step.py [--seq-len 64] [--json out.json]

Builds the model on the GPU (every system on, sidecars included), runs one training step on
random bytes, and reports peak memory and the time of each phase. Appends nothing by itself:
the caller records the printed table in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from arbd.config import get_preset
from arbd.model.arb import ARBModel, area_weights
from arbd.ternary import ternary_state_bytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--backend", default="torch")
    p.add_argument("--json", default=None)
    p.add_argument("--preset", default="arb-3b")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda":  # a CPU dry run of the script itself (arb-tiny)
        torch.cuda.synchronize = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.get_device_name = lambda: "cpu"
    else:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = ARBModel(get_preset(args.preset), backend=args.backend, device=dev)
    torch.cuda.synchronize()
    t_build = time.perf_counter() - t0
    state_bytes, weights = ternary_state_bytes(model)
    after_build = torch.cuda.max_memory_allocated()
    ids = torch.randint(0, 256, (1, args.seq_len + 1), device=dev)
    res = {}
    for step in range(2):  # the second step is the one timed (first pays lazy init)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = model(ids, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        out.loss.backward()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        applied = model._ternary_update_memory(loss_signal=out.loss)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        res = {"forward_s": t2 - t1, "backward_s": t3 - t2, "update_s": t4 - t3,
               "loss": out.loss.item(), "applied": applied}
    res.update({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "seq_len": args.seq_len, "build_s": t_build,
        "logical_ternary_weights": weights, "areas": area_weights(model),
        "persistent_state_GB": state_bytes / 1e9,
        "all_buffers_GB": sum(b.numel() * b.element_size() for b in model.buffers()) / 1e9,
        "peak_after_build_GiB": after_build / 2**30,
        "peak_step_GiB": torch.cuda.max_memory_allocated() / 2**30,
    })
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
