"""Host cost per call of the operations a ternary training step is made of (issue 10).

    python3 bench/host_overhead.py [--json out.json]

For each operation: enqueue time per call (host wall time of N calls with no synchronisation;
small enough shapes keep the GPU ahead, so this is the launch path's cost) and device time per
call (CUDA events). A step is host-bound where enqueue > device. Shapes are arb-small's
(d_model 1024, 8 x 1022 tokens).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.ternary import triton_kernels as tk  # noqa: E402
from arbd.ternary.layers import TernaryLinear  # noqa: E402


def device_ms_per_call(fn, n: int) -> float:
    """Device time per call (ms) of n back-to-back calls, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def measure(fn, n: int = 50) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return host * 1e6, device_ms_per_call(fn, n) * 1e3


def shape_costs(x, gy, w, packed, exp, K) -> None:
    """Per-call host time (median, us; no synchronisation inside a pass) when M changes every call:
    pass 1 sizes never seen in this process, pass 2 the same sizes again, pass 3 sizes rounded up
    to a multiple of 1024 (at most 8 distinct, all seen in a warm-up pass)."""
    gen = torch.Generator().manual_seed(1)
    cfg = tk.TileConfig(128, 128, 32, num_warps=8, num_stages=3, planar_x=True)
    ops_ = {
        "mm bf16 [M,1024] @ [1024,4096]": lambda m: x[:m] @ w.t(),
        "mm fp32 out [4096,M] @ [M,1024] (weight grad)": lambda m: torch.mm(gy[:m].t(), x[:m], out_dtype=torch.float32),
        "addmm fp32 in place (weight grad into evidence)": lambda m: torch.addmm(
            acc, gy[:m].t(), x[:m], out_dtype=torch.float32, out=acc),
        "ternary_matmul dense path (decode + cuBLAS)": lambda m: tk.ternary_matmul(x[:m], packed, exp, K),
        "ternary_matmul fused Triton kernel": lambda m: tk.ternary_matmul(x[:m], packed, exp, K, config=cfg),
        "grad_input dense path": lambda m: tk.ternary_matmul_grad_input(gy[:m], packed, exp, K),
    }
    acc = torch.zeros(gy.shape[1], x.shape[1], device=x.device)

    def pass_(fn, sizes):
        times = []
        for m in sizes:
            t0 = time.perf_counter()
            fn(m)
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return sorted(times)[len(times) // 2] * 1e6

    print("| operation | new M each call | same M set again | M bucketed to 1024 |\n| --- | ---: | ---: | ---: |")
    for name, fn in ops_.items():
        sizes = torch.randint(700, 7000, (48,), generator=gen).tolist()
        buckets = [-(-m // 1024) * 1024 for m in sizes]
        for m in sorted(set(buckets)):
            fn(m)
        torch.cuda.synchronize()
        print(f"| {name} | {pass_(fn, sizes):.0f} | {pass_(fn, sizes):.0f} | {pass_(fn, buckets):.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--shapes", action="store_true",
                   help="only: host cost of cuBLAS / Triton calls whose M changes (first sight, seen before, bucketed)")
    p.add_argument("--dissect", action="store_true",
                   help="also profile 50 calls of one case (cProfile, torch.profiler)")
    p.add_argument("--case", default="TernaryLinear forward+backward",
                   help="with --dissect: the case to profile (a substring of its name)")
    a = p.parse_args()
    dev = torch.device("cuda")
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    M, K, N = 8 * 1022, 1024, 4096
    x = torch.randn(M, K, device=dev, dtype=bf, generator=g)
    gy = torch.randn(M, N, device=dev, dtype=bf, generator=g)
    w = torch.randn(N, K, device=dev, dtype=bf, generator=g)
    small = torch.randn(1024, device=dev)
    lin = TernaryLinear(K, N, backend="triton", device=dev)
    packed, exp = lin.weight.packed, lin.weight.exponent
    if a.shapes:
        return shape_costs(x, gy, w, packed, exp, K)
    ms = torch.randint(300, 3000, (64,)).tolist()
    ms2 = torch.randint(300, 3000, (64,)).tolist()   # sizes cuBLAS has not seen in this process
    it = iter(range(10**9))
    cases = {
        "torch add (1024 floats)": lambda: small.add(1.0),
        "torch mm bf16 8176x1024 @ 1024x4096": lambda: x @ w.t(),
        "torch mm, M varying 300..3000": lambda: x[: ms[next(it) % 64]] @ w.t(),
        "decode_weight 4096x1024 (Triton)": lambda: tk.decode_weight(packed, exp, K, bf),
        "ternary_matmul M=8176 (dense path)": lambda: tk.ternary_matmul(x, packed, exp, K),
        "ternary_matmul M=40 (fused + reduce)": lambda: tk.ternary_matmul(x[:40], packed, exp, K),
        "ternary_matmul M=100 (fused)": lambda: tk.ternary_matmul(x[:100], packed, exp, K),
        "grad_input M=8176 (dense path)": lambda: tk.ternary_matmul_grad_input(gy, packed, exp, K),
        "weight_grad M=8176 (Triton)": lambda: tk.weight_grad(gy, x),
        "weight_grad M=8176, torch mm fp32 out": lambda: torch.mm(gy.t(), x, out_dtype=torch.float32)
        if hasattr(torch, "mm") else None,
        "add_grad 4096x1024": lambda: lin.weight.add_grad(w.float()),
    }
    xr = x.detach().requires_grad_(True)

    def layer_fb():
        y = lin(xr)
        y.backward(gy)
    cases["TernaryLinear forward+backward M=8176"] = layer_fb
    cases["TernaryLinear forward only (grad enabled) M=8176"] = lambda: lin(xr)
    y_kept = lin(xr)
    cases["TernaryLinear backward only M=8176"] = lambda: y_kept.backward(gy, retain_graph=True)
    dense = torch.nn.Linear(K, N, bias=False, device=dev, dtype=bf)
    cases["nn.Linear bf16 forward+backward M=8176"] = lambda: dense(xr).backward(gy)
    from arbd.ternary.layers import TernaryRMSNorm
    norm = TernaryRMSNorm(K, device=dev)
    gain = torch.ones(K, device=dev, dtype=bf, requires_grad=True)
    gx = torch.randn(M, K, device=dev, dtype=bf, generator=g)
    cases["TernaryRMSNorm forward+backward M=8176"] = lambda: norm(xr).backward(gx)
    cases["F.rms_norm bf16 forward+backward M=8176"] = \
        lambda: torch.nn.functional.rms_norm(xr, (K,), gain).backward(gx)
    from arbd.ternary import ops
    cases["ops.linear_forward, M varying 300..3000"] = \
        lambda: ops.linear_forward(x[: ms2[next(it) % 64]], packed, exp, K, "triton")
    cases["ops.linear_grad_input, M varying 300..3000"] = \
        lambda: ops.linear_grad_input(gy[: ms2[next(it) % 64]], packed, exp, K, "triton")
    rows = {}
    print("| operation | enqueue us/call | device us/call |\n| --- | ---: | ---: |")
    for name, fn in cases.items():
        try:
            h, d = measure(fn)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | |")
            continue
        rows[name] = {"enqueue_us": h, "device_us": d}
        print(f"| {name} | {h:.1f} | {d:.1f} |")
    if a.dissect:
        import cProfile
        import io
        import pstats
        name, fn = next((n, f) for n, f in cases.items() if a.case in n)
        print(f"-- dissected: {name}")
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print("\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as tp:
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
