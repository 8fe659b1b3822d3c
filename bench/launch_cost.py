#!/usr/bin/env python3
"""Host cost of one Triton launch through the JIT (`kernel[grid](...)`) against the compiled
kernel it returns, launched directly (issue 10: the host-bound step). Prints microseconds per
call for each path and whether their outputs agree; GPU only.

    python3 bench/launch_cost.py
"""
from __future__ import annotations

import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.ternary import packing  # noqa: E402
from arbd.ternary import triton_kernels as tk  # noqa: E402


def per_call_us(fn, n: int = 2000, rounds: int = 5) -> float:
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    g = torch.Generator().manual_seed(0)
    n, k = 64, 64
    packed = packing.pack_trits(torch.randint(-1, 2, (n, k), generator=g)).to(dev)
    exponent = torch.randint(-8, 8, (n,), generator=g).to(torch.int8).to(dev)
    table = packing.exponent_to_scale_table(dev, torch.bfloat16)
    out = torch.empty(n, k, dtype=torch.bfloat16, device=dev)
    args = (packed, exponent, table, out, n, k, packed.stride(0), out.stride(0))
    grid = (triton.cdiv(n, 8), triton.cdiv(k, 512), 1)   # the compiled runner reads three
    jit = lambda: tk._decode_kernel[grid](*args, BLOCK_R=8, BLOCK_C=512, num_warps=4)  # noqa: E731
    compiled = jit()
    ref = out.clone()
    print("CompiledKernel.run signature:", inspect.signature(compiled.run) if hasattr(compiled, "run") else None)
    runner = compiled[grid]
    results = {}
    # triton 3.6's launcher takes every argument, constexprs included, in the kernel's order
    for label, call in (("jit", jit), ("compiled, all args", lambda: runner(*args, 8, 512)),
                        ("decode_weight (wrapper + jit)", lambda: tk.decode_weight(packed, exponent, k)),
                        ("torch.empty + add_", lambda: torch.empty(n, k, device=dev).add_(1.0)),
                        ("x.sum()", lambda: out.sum())):
        try:
            out.zero_()
            call()
            torch.cuda.synchronize()
            same = torch.equal(out, ref) if "compiled" in label or label == "jit" else None
            results[label] = (per_call_us(call), same)
        except Exception as exc:  # noqa: BLE001 - a probe: report and go on
            results[label] = (None, repr(exc)[:300])
    for label, (us, same) in results.items():
        print(f"{label:34s} {'error' if us is None else f'{us:7.1f} us'}  output equal: {same}")


if __name__ == "__main__":
    main()
