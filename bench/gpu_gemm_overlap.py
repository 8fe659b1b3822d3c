"""Large-M ternary forward: decode W in column chunks on a side stream while cuBLAS multiplies the
chunk before (issue 10, M = 8192 target: at least 1.0x cuBLAS bf16).

    python3 bench/gpu_gemm_overlap.py [--m 8192] [--n 7168] [--k 7168] [--reps 20]

The default large-M forward (`ternary_matmul`'s dense path) decodes the whole W [N, K] to bf16,
then calls cuBLAS: the decode (write N*K*2 bytes) is exposed, ~6% of the GEMM at 8192 x 7168 x
7168. Here W is decoded in C chunks of rows (output columns); chunk i+1 decodes on a side stream
(optionally of high priority, so its blocks are scheduled as the GEMM's retire) while cuBLAS
writes out[:, chunk i]. Only the first chunk's decode is exposed; the price is C GEMMs of N/C
columns instead of one. All variants run side by side in one process; ms are medians of CUDA
event times over `reps` calls after warm-up; the result of each variant is compared with the
default path's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.ternary import packing  # noqa: E402
from arbd.ternary.triton_kernels import decode_weight, ternary_matmul  # noqa: E402


def pipelined(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, k: int, chunks: int,
              side: torch.cuda.Stream) -> torch.Tensor:
    n = packed.shape[0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    main = torch.cuda.current_stream()
    bounds = [n * i // chunks for i in range(chunks + 1)]
    side.wait_stream(main)   # x, packed and out are ready on the main stream
    ws, done = [], []
    with torch.cuda.stream(side):
        for a, b in zip(bounds, bounds[1:]):
            w = decode_weight(packed[a:b], exponent[a:b], k, x.dtype)
            ev = torch.cuda.Event()
            ev.record(side)
            ws.append(w)
            done.append(ev)
    for (a, b), w, ev in zip(zip(bounds, bounds[1:]), ws, done):
        main.wait_event(ev)
        w.record_stream(main)   # allocated on the side stream, last used on the main one
        torch.mm(x, w.t(), out=out[:, a:b])
    return out


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--n", type=int, default=7168)
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    m, n, k = args.m, args.n, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    trits = torch.randint(-1, 2, (n, k), device="cuda", generator=g, dtype=torch.int8)
    packed = packing.pack_trits(trits)
    exponent = torch.randint(-20, 20, (n,), device="cuda", generator=g, dtype=torch.int8)
    w16 = decode_weight(packed, exponent, k, torch.bfloat16)
    lo, hi = torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1)   # -1: higher
    variants = {"cublas_bf16": lambda: x @ w16.t(),
                "decode+cublas (default)": lambda: ternary_matmul(x, packed, exponent, k)}
    for c in (2, 3, 4, 8):
        for name, s in (("high", hi), ("normal", lo)):
            variants[f"pipelined C={c} {name}"] = (lambda c=c, s=s: pipelined(x, packed, exponent, k, c, s))
    ref = ternary_matmul(x, packed, exponent, k)
    for name, fn in variants.items():
        y = fn()
        torch.cuda.synchronize()
        diff = (y.float() - ref.float()).abs().max().item()
        same = torch.equal(y, ref)
        print(f"check {name}: equal={same} max|diff|={diff:.3g}")
        if diff > 1e-2 * ref.float().abs().max().item():
            raise SystemExit(f"{name} differs from the default path")
    times = {name: [] for name in variants}
    for _ in range(args.rounds):   # rounds interleave the variants
        for name, fn in variants.items():
            times[name].append(timed(fn, args.reps))
    base = statistics.median(times["cublas_bf16"])
    flops = 2 * m * n * k
    print(f"M={m} N={n} K={k} on {torch.cuda.get_device_name()}")
    print(f"{'variant':28s} {'ms':>8s} {'TFLOP/s':>8s} {'cuBLAS/this':>11s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:28s} {t:8.4f} {flops / t / 1e9:8.1f} {base / t:11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
