#!/usr/bin/env python3
"""Large-M packed-ternary forward: the fused warp-specialised kernel (csrc/large_m.cu) against cuBLAS
bf16 and the default path (decode_weight + cuBLAS), side by side in one run.

Checks first: the CUDA fragment-word copy equals its torch reference; the fused product, on fresh random
x with the output poisoned with NaN, against a float64 reference (rel err < 3e-3, like every bf16
path here), at ragged shapes and at the target shape, for each compiled stage count. Then timings:
each candidate is timed with CUDA events over CALLS back-to-back calls, candidates interleaved
ROUNDS times after a warm-up that runs cuBLAS for about two seconds (clocks settle under load);
reported: each candidate's median ms per call and cuBLAS / candidate.

    PYTHONUNBUFFERED=1 python3 bench/gpu_gemm_large_m.py [--ms 8192] [--rounds 5]   # JSON to $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from arbd.ternary import cuda_large_m as lm  # noqa: E402
from arbd.ternary import packing  # noqa: E402
from arbd.ternary import triton_kernels as tk  # noqa: E402
from bench.gpu_gemm_sweep import log, rel_err, weight  # noqa: E402 - the sweep's own helpers
from bench.host_overhead import device_ms_per_call  # noqa: E402

DEV = torch.device("cuda")
KN = 7168
CALLS = 10
torch.backends.cuda.matmul.allow_tf32 = False


def checks(rows: list[dict]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(3)
    for n, k in ((300, 328), (7168, 7168), (514, 1000), (1000, 7000), (77, 1001)):
        packed, _ = weight(n, k, gen)
        ok = torch.equal(lm.frags_copy(packed, k).cpu(), lm.frags_reference(packed.cpu(), k))
        rows.append({"kind": "check", "what": f"frags_copy N={n} K={k}", "ok": ok})
    for m, n, k in ((200, 304, 328), (129, 520, 1000), (1000, 1536, 2048), (300, 1000, 7000), (8192, KN, KN)):
        packed, exponent = weight(n, k, gen)
        w = packing.decode(packed, exponent, k, torch.bfloat16).double()  # W as the dense path decodes it
        frags = lm.frags_copy(packed, k)
        for stages in lm.STAGES:
            for rep in range(2):
                x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
                y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
                lm.large_m_matmul(x, packed, exponent, k, frags=frags, stages=stages, out=y)
                torch.cuda.synchronize()
                err = rel_err(y, x.double() @ w.t())
                rows.append({"kind": "check", "what": f"fused M={m} N={n} K={k} stages={stages} rep{rep}",
                             "rel_err": err, "ok": bool(err < 3e-3 and not y.isnan().any())})
                log(str(rows[-1]))


def timings(m: int, rounds: int, rows: list[dict]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(4)
    packed, exponent = weight(KN, KN, gen)
    x = torch.randn(m, KN, generator=gen, device=DEV).to(torch.bfloat16)
    wd = tk.decode_weight(packed, exponent, KN, torch.bfloat16)
    frags = lm.frags_copy(packed, KN)
    y = torch.empty(m, KN, dtype=torch.bfloat16, device=DEV)
    dense = tk.TileConfig(128, 128, 32, dense=True)
    cands = {
        "cuBLAS bf16 x @ W.T": lambda: torch.mm(x, wd.t(), out=y),
        "default: decode_weight + cuBLAS": lambda: tk.ternary_matmul(x, packed, exponent, KN, config=dense),
        "fused, fragment copy per call": lambda: lm.large_m_matmul(x, packed, exponent, KN, out=y),
        "fused kernel (copy made once)": lambda: lm.large_m_matmul(x, packed, exponent, KN, frags=frags, out=y),
        "fused kernel, 3 stages": lambda: lm.large_m_matmul(x, packed, exponent, KN, frags=frags, stages=3, out=y),
        "probe: no output": lambda: lm.large_m_matmul(x, packed, exponent, KN, frags=frags, out=y, _flags=4),
        "fragment copy alone": lambda: lm.frags_copy(packed, KN),
        "decode_weight alone": lambda: tk.decode_weight(packed, exponent, KN, torch.bfloat16),
    }
    for fn in cands.values():
        fn()
    t0 = time.time()
    while time.time() - t0 < 2.0:
        cands["cuBLAS bf16 x @ W.T"]()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for label, fn in cands.items():
            times[label].append(device_ms_per_call(fn, CALLS))
    base = statistics.median(times["cuBLAS bf16 x @ W.T"])
    flops = 2.0 * m * KN * KN
    for label, ts in times.items():
        med = statistics.median(ts)
        rows.append({"kind": "time", "M": m, "what": label, "ms": med, "spread_ms": [min(ts), max(ts)],
                     "vs_cublas": base / med, "tflops": flops / med / 1e9})
        log(f"M={m} {label:34s} {med:.4f} ms ({min(ts):.4f}-{max(ts):.4f})  cuBLAS/this {base / med:.3f}x"
            f"  {flops / med / 1e9:.0f} TFLOP/s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[8192])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-checks", action="store_true")
    args = ap.parse_args()
    rows: list[dict] = []
    failed = False
    try:
        if not args.no_checks:
            checks(rows)
        for m in args.ms:
            timings(m, args.rounds, rows)
    except Exception:
        traceback.print_exc()
        failed = True
    bad = [r for r in rows if r["kind"] == "check" and not r["ok"]]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_gemm_large_m.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"\n{len(rows)} rows; checks failed: {len(bad)}")
    for r in bad:
        print("FAILED", r)
    for r in rows:
        if r["kind"] == "time":
            print(f"M={r['M']:5d} {r['what']:34s} {r['ms']:.4f} ms  {r['vs_cublas']:.3f}x  {r['tflops']:.0f} TFLOP/s")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
