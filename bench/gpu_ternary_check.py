#!/usr/bin/env python3
"""GPU check of the Triton ternary kernels (arbd/ternary/triton_kernels.py).

1. bf16 correctness of ternary_matmul, ternary_matmul_grad_input and weight_grad against a float64
   reference at a few shapes (relative Frobenius error, expected < 1e-2), plus fp32/fp16 spot checks.
2. Median times (triton.testing.do_bench, L2 flushed between repetitions) at K = N = 7168:
   forward at M = 16 and M = 8192 against cuBLAS bf16 x @ W.T with a dense bf16 W, and the two
   backward products at M = 8192 against their cuBLAS equivalents; then a small sweep of tile
   shapes. Every timed configuration is also checked against an fp32 reference.

Prints markdown tables; writes JSON to $OUT/gpu_ternary_check.json when OUT is set. Meant to finish
in well under 3 minutes on one H100 (most of it is Triton compiling the swept configurations).

    PYTHONUNBUFFERED=1 python3 bench/gpu_ternary_check.py
    python bench/gpu_ternary_check.py --dry-run   # tiny shapes on CPU through the Triton
                                                  # interpreter: tests this script, not the GPU
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from arbd.ternary import packing  # noqa: E402
from arbd.ternary import triton_kernels as tk  # noqa: E402
from arbd.ternary.triton_kernels import TileConfig  # noqa: E402

START = time.time()
ROUNDS = 5  # cuBLAS / default pairs timed alternately
# The timings are in bf16; the dry run uses fp16 (Triton's interpreter gets bf16 arithmetic wrong).
TIMING_DTYPE = torch.float16 if DRY_RUN else torch.bfloat16
SWEEP_DEADLINE_S = 150.0  # stop sweeping (not the required rows) past this point
DEV = torch.device("cpu" if DRY_RUN else "cuda")
SIZE = 70 if DRY_RUN else 7168  # K = N of the timed problems
BIG_M = 40 if DRY_RUN else 8192
RESULTS: dict = {"correctness": [], "timings": [], "sweep": [], "errors": []}


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    return float((got.to(torch.float64) - ref).norm() / ref.norm())


def cfg_name(cfg: TileConfig | None) -> str:
    if cfg is None:
        return "default"
    s = f"bm{cfg.block_m} bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
    if cfg.split_k > 1:
        s += f" split{cfg.split_k}"
    if cfg.planar_x:
        s += " planar"
    if cfg.prefetch:
        s += " prefetch"
    if cfg.fixup:
        s += " fixup"
    if cfg.asm_decode:
        s += " asm"
    if cfg.dense:
        s = "dense (decode_weight + cuBLAS)"
    return s


def random_weight(n: int, k: int, gen: torch.Generator):
    trits = torch.randint(-1, 2, (n, k), generator=gen, device=DEV)
    # Exponents around the init scale of a k-wide layer (2**(E/16) ~ 1/sqrt(k)).
    centre = int(-16 * 0.5 * torch.log2(torch.tensor(float(k))))
    exponent = torch.randint(centre - 8, centre + 8, (n,), generator=gen, device=DEV).to(torch.int8)
    return packing.pack_trits(trits), exponent


# ---------------------------------------------------------------------------------------------
# 1. Correctness against float64


def check_correctness() -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    cases = [(3, 37, 19, torch.bfloat16), (16, 7168, 7168, torch.bfloat16), (300, 1001, 515, torch.bfloat16),
             (1024, 2050, 1536, torch.bfloat16), (300, 1001, 515, torch.float16), (300, 1001, 515, torch.float32)]
    if DRY_RUN:
        cases = [(3, 37, 19, torch.float32), (33, 130, 65, torch.float16)]
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
    for m, k, n, dtype in cases:
        packed, exponent = random_weight(n, k, gen)
        w = packing.decode(packed, exponent, k, torch.float64)
        x = torch.randn(m, k, generator=gen, device=DEV).to(dtype)
        gy = torch.randn(m, n, generator=gen, device=DEV).to(dtype)
        checks = {
            "ternary_matmul": (lambda: tk.ternary_matmul(x, packed, exponent, k), lambda: x.double() @ w.t()),
            "grad_input": (lambda: tk.ternary_matmul_grad_input(gy, packed, exponent, k), lambda: gy.double() @ w),
            "weight_grad": (lambda: tk.weight_grad(gy, x), lambda: gy.double().t() @ x.double()),
        }
        for name, (run, ref) in checks.items():
            row = {"kernel": name, "dtype": str(dtype).replace("torch.", ""), "M": m, "K": k, "N": n}
            try:
                err = rel_err(run(), ref())
                row.update(rel_err=err, ok=err < tol[dtype])
            except Exception as exc:  # keep going: a failure here is a result too
                row.update(rel_err=None, ok=False, error=repr(exc))
                RESULTS["errors"].append(f"{name} {m}x{k}x{n} {dtype}: {traceback.format_exc()}")
            RESULTS["correctness"].append(row)
            log(f"correctness {row}")
    # Every byte value 0..242 decodes exactly (K = 5, x = I).
    packed = torch.arange(243, dtype=torch.uint8, device=DEV).reshape(243, 1)
    exponent = torch.randint(-128, 128, (243,), generator=gen, device=DEV).to(torch.int8)
    y = tk.ternary_matmul(torch.eye(5, device=DEV), packed, exponent, 5)
    err = rel_err(y.t(), packing.decode(packed, exponent, 5, torch.float64))
    RESULTS["correctness"].append({"kernel": "all 243 byte values", "dtype": "float32", "M": 5, "K": 5,
                                   "N": 243, "rel_err": err, "ok": err < 1e-6})


# ---------------------------------------------------------------------------------------------
# 2. Timings


def bench(fn) -> float:
    fn()
    if DRY_RUN:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def timing_problem(m: int, k: int = 7168, n: int = 7168):
    gen = torch.Generator(device=DEV).manual_seed(m)
    packed, exponent = random_weight(n, k, gen)
    w_dense = packing.decode(packed, exponent, k, TIMING_DTYPE)
    x = torch.randn(m, k, generator=gen, device=DEV).to(TIMING_DTYPE)
    gy = torch.randn(m, n, generator=gen, device=DEV).to(TIMING_DTYPE)
    return packed, exponent, w_dense, x, gy


def fp32_refs(w_dense, x, gy, need_backward: bool):
    torch.backends.cuda.matmul.allow_tf32 = False  # exact bf16 products, fp32 sums
    w = w_dense.float()
    refs = {"forward": x.float() @ w.t()}
    if need_backward:
        refs["grad_input"] = gy.float() @ w
        refs["weight_grad"] = gy.float().t() @ x.float()
    return refs


def run_timings() -> None:
    k = n = SIZE
    fwd16 = [None, TileConfig(16, 64, 32, 4, 3, split_k=3), TileConfig(16, 64, 32, 4, 3, split_k=1),
             TileConfig(16, 64, 32, 4, 3, split_k=10), TileConfig(16, 64, 64, 4, 3, split_k=5),
             TileConfig(16, 64, 32, 4, 3, split_k=5, prefetch=True),
             TileConfig(16, 128, 32, 8, 3, split_k=10), TileConfig(16, 64, 32, 4, 3, split_k=5, planar_x=True)]
    fwd_big = [None, TileConfig(128, 128, 32, 8, 3, planar_x=True, prefetch=True),
               TileConfig(128, 128, 32, 8, 3), TileConfig(128, 128, 64, 8, 2, planar_x=True),
               TileConfig(128, 64, 32, 4, 4, planar_x=True)]
    gi_big = [None, TileConfig(128, 128, 32, 8, 3), TileConfig(64, 64, 32, 4, 3),
              TileConfig(128, 64, 16, 8, 4)]
    wg_big = [None, TileConfig(64, 128, 256, 8, 3), TileConfig(64, 256, 128, 8, 3),
              TileConfig(32, 128, 128, 4, 4)]

    for m, plan in ((16, {"forward": fwd16}),
                    (BIG_M, {"forward": fwd_big, "grad_input": gi_big, "weight_grad": wg_big})):
        packed, exponent, w_dense, x, gy = timing_problem(m, k, n)
        refs = fp32_refs(w_dense, x, gy, need_backward=m == BIG_M)
        ours = {
            "forward": lambda cfg: tk.ternary_matmul(x, packed, exponent, k, config=cfg),
            "grad_input": lambda cfg: tk.ternary_matmul_grad_input(gy, packed, exponent, k, config=cfg),
            "weight_grad": lambda cfg: tk.weight_grad(gy, x, config=cfg),
        }
        cublas = {
            "forward": ("cuBLAS bf16 x @ W.T", lambda: x @ w_dense.t()),
            "grad_input": ("cuBLAS bf16 gy @ W", lambda: gy @ w_dense),
            "weight_grad": ("cuBLAS bf16 gy.T @ x (bf16 out)", lambda: gy.t() @ x),
        }
        for op, configs in plan.items():
            base_name, base_fn = cublas[op]
            t_base = bench(base_fn)
            extra = {}
            if op == "forward" and m == 16:
                extra["torch backend: decode W + cuBLAS"] = bench(
                    lambda: x @ packing.decode(packed, exponent, k, TIMING_DTYPE).t())
            if op == "weight_grad":
                try:
                    extra["cuBLAS bf16 gy.T @ x (fp32 out)"] = bench(
                        lambda: torch.mm(gy.t(), x, out_dtype=torch.float32))
                except Exception as exc:
                    log(f"fp32-out cuBLAS unavailable: {repr(exc)[:200]}")
            for i, cfg in enumerate(configs):
                if i > 0 and time.time() - START > SWEEP_DEADLINE_S:
                    log(f"sweep deadline reached, skipping {op} M={m} {cfg_name(cfg)}")
                    continue
                row = {"op": op, "M": m, "K": k, "N": n, "config": cfg_name(cfg),
                       "resolved": cfg_name(_resolved(op, m, n, k) if cfg is None else cfg),
                       "cublas": base_name, "cublas_ms": t_base}
                try:
                    out = ours[op](cfg)
                    row["rel_err_vs_fp32"] = rel_err(out, refs[op])
                    del out
                    if cfg is None:
                        # The default path against cuBLAS, alternated ROUNDS times: clocks drift
                        # over a run by more than the gap measured one after the other.
                        pairs = [(bench(base_fn), bench(lambda: ours[op](cfg))) for _ in range(ROUNDS)]
                        row["cublas_rounds_ms"], row["rounds_ms"] = map(list, zip(*pairs))
                        row["cublas_ms"] = statistics.median(row["cublas_rounds_ms"])
                        row["ms"] = statistics.median(row["rounds_ms"])
                        row["speedup_vs_cublas"] = row["cublas_ms"] / row["ms"]
                    else:
                        row["ms"] = bench(lambda: ours[op](cfg))
                        row["speedup_vs_cublas"] = t_base / row["ms"]
                except Exception as exc:
                    row["error"] = repr(exc)
                    RESULTS["errors"].append(f"{op} M={m} {cfg_name(cfg)}: {traceback.format_exc()}")
                (RESULTS["timings"] if cfg is None else RESULTS["sweep"]).append(row)
                log(f"timing {row}")
            for name, t in extra.items():
                RESULTS["timings"].append({"op": op, "M": m, "K": k, "N": n, "config": name, "ms": t,
                                           "cublas": base_name, "cublas_ms": t_base,
                                           "speedup_vs_cublas": t_base / t, "reference_row": True})
        del packed, exponent, w_dense, x, gy, refs
        if not DRY_RUN:
            torch.cuda.empty_cache()


def _resolved(op: str, m: int, n: int, k: int) -> TileConfig:
    if op == "forward":
        return tk.matmul_config(m, n, k, DEV)
    if op == "grad_input":
        return tk.grad_input_config(m, n, k)
    return tk.weight_grad_config(m, n, k)


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def report() -> None:
    print("\n## Correctness (relative Frobenius error vs float64)\n")
    print("| kernel | dtype | M | K | N | rel err | ok |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in RESULTS["correctness"]:
        print(f"| {r['kernel']} | {r['dtype']} | {r['M']} | {r['K']} | {r['N']} | "
              f"{fmt(r.get('rel_err'), '.2e')} | {'yes' if r['ok'] else 'NO'} |")
    print(f"\n## Timings, K = N = {SIZE}, bf16 (median ms, L2 flushed)\n")
    print("| op | M | ours (config) | ours ms | cuBLAS | cuBLAS ms | speedup | rel err vs fp32 |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |")
    for r in RESULTS["timings"]:
        name = r["config"] if r.get("reference_row") else f"default: {r.get('resolved')}"
        print(f"| {r['op']} | {r['M']} | {name} | {fmt(r.get('ms'), '.4f')} | {r['cublas']} | "
              f"{r['cublas_ms']:.4f} | {fmt(r.get('speedup_vs_cublas'), '.2f')}x | "
              f"{fmt(r.get('rel_err_vs_fp32'), '.1e')} |")
    print("\n## Sweep of tile shapes (same problems)\n")
    print("| op | M | config | ms | speedup vs cuBLAS | rel err vs fp32 |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in RESULTS["sweep"]:
        print(f"| {r['op']} | {r['M']} | {r['config']} | {fmt(r.get('ms'), '.4f')} | "
              f"{fmt(r.get('speedup_vs_cublas'), '.2f')}x | {fmt(r.get('rel_err_vs_fp32'), '.1e')} |")
    if RESULTS["errors"]:
        print("\n## Errors\n")
        for e in RESULTS["errors"]:
            print(e)


def main() -> int:
    if DRY_RUN:
        RESULTS["device"] = "CPU, Triton interpreter (dry run: timings and bf16 errors mean nothing)"
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --dry-run)")
        return 2
    else:
        props = torch.cuda.get_device_properties(DEV)
        RESULTS["device"] = f"{props.name}, {props.multi_processor_count} SMs"
    RESULTS["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
    log(f"{RESULTS['device']}; torch {torch.__version__}, triton {triton.__version__}")
    for stage in (check_correctness, run_timings):
        try:
            stage()
        except Exception:
            RESULTS["errors"].append(f"{stage.__name__}: {traceback.format_exc()}")
            log(f"{stage.__name__} failed:\n{traceback.format_exc()}")
    RESULTS["wall_s"] = time.time() - START
    report()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_ternary_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    log("done")
    return 0 if all(r["ok"] for r in RESULTS["correctness"]) and not RESULTS["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
