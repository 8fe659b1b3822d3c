"""Host time per call of the model's building blocks against their torch equivalents (issue 10: the
checkpointed arb-small step is bound by the host, bench/RESULTS.md).

    python3 bench/host_overhead.py [--rows 256] [--calls 300] [--cprofile NAME]

Each case runs `calls` times back to back with one synchronisation at the end, on shapes whose GPU
work is a few microseconds, so the time per call is what the host spends issuing it; the GPU time
per call (CUDA events around the same loop) is printed beside it to show that the GPU waited.
With --cprofile NAME, that case's calls run under cProfile and its top functions are printed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.ternary import TernaryLinear, TernaryRMSNorm  # noqa: E402
from arbd.ternary.triton_kernels import decode_weight  # noqa: E402


def cases(rows: int, d: int) -> dict:
    """name -> a no-argument callable issuing one call (forward, or forward + backward)."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(dev, bf16).requires_grad_()
    dense = nn.Linear(d, d, bias=False).to(dev, bf16)
    tern = TernaryLinear(d, d, backend="triton", generator=g, device=dev)
    norm = TernaryRMSNorm(d, device=dev)
    gain = torch.ones(d, device=dev, dtype=bf16, requires_grad=True)
    w = tern.weight

    @torch.no_grad()
    def dense_fwd():
        dense(x)

    @torch.no_grad()
    def tern_fwd():
        tern(x)

    return {
        "nn.Linear forward (no grad)": dense_fwd,
        "TernaryLinear forward (no grad)": tern_fwd,
        "nn.Linear forward + backward": lambda: dense(x).sum().backward(),
        "TernaryLinear forward + backward": lambda: tern(x).sum().backward(),
        "decode_weight": lambda: decode_weight(w.packed, w.exponent, w.cols, bf16),
        "F.rms_norm forward + backward": lambda: F.rms_norm(x, (d,), gain).sum().backward(),
        "TernaryRMSNorm forward + backward": lambda: norm(x).sum().backward(),
        "x.sum().backward() alone": lambda: x.sum().backward(),
        "torch.add": lambda: torch.add(x, x),
    }


def per_call_us(fn, calls: int) -> tuple[float, float]:
    """(host wall us per call, GPU event us per call) over `calls` calls and one sync."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(calls):
        fn()
    e.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return wall / calls * 1e6, s.elapsed_time(e) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256, help="M: at least DENSE_MIN_M takes the dense path")
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3, help="the table gives the median of these")
    p.add_argument("--cprofile", default="", help="a case name (substring) to profile")
    a = p.parse_args()
    cs = cases(a.rows, a.d)
    print(f"host us per call, {a.rows} x {a.d} bf16, {a.calls} calls, median of {a.repeats} "
          f"(GPU us per call beside it)")
    print("| case | host us | GPU us |\n| --- | ---: | ---: |")
    for name, fn in cs.items():
        runs = sorted(per_call_us(fn, a.calls) for _ in range(a.repeats))
        host, gpu = runs[len(runs) // 2]
        print(f"| {name} | {host:.1f} | {gpu:.1f} |")
    if a.cprofile:
        name, fn = next((n, f) for n, f in cs.items() if a.cprofile in n)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.calls):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print(f"-- {name} under cProfile, {a.calls} calls\n"
              + "\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()))


if __name__ == "__main__":
    main()
