#!/usr/bin/env python3
"""Packed-ternary GEMM: correctness of the new paths, then side-by-side timings against cuBLAS bf16.

Paths (arbd/ternary/triton_kernels.py): the fused kernel with the one-launch split-K fixup and the
packed-integer PTX decode (M <= 64), and the dense path (decode_weight, then cuBLAS) for large M.
Every timed configuration is also checked against an fp32 reference (no tf32) on the same data.
Times: triton.testing.do_bench medians (L2 flushed between repetitions), in ms.

    PYTHONUNBUFFERED=1 python3 bench/gpu_gemm_sweep.py      # writes $OUT/gpu_gemm_sweep.json if OUT is set
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from arbd.ternary import packing  # noqa: E402
from arbd.ternary import triton_kernels as tk  # noqa: E402
from arbd.ternary.triton_kernels import TileConfig as C  # noqa: E402

START = time.time()
DEV = torch.device("cuda")
KN = 7168
ROWS: list[dict] = []
ERRORS: list[str] = []
torch.backends.cuda.matmul.allow_tf32 = False


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def rel_err(got, ref) -> float:
    ref = ref.to(torch.float64)
    return float((got.to(torch.float64) - ref).norm() / ref.norm())


def weight(n: int, k: int, gen):
    trits = torch.randint(-1, 2, (n, k), generator=gen, device=DEV)
    centre = int(-16 * 0.5 * torch.log2(torch.tensor(float(k))))
    exponent = torch.randint(centre - 8, centre + 8, (n,), generator=gen, device=DEV).to(torch.int8)
    return packing.pack_trits(trits), exponent


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def name(cfg) -> str:
    if cfg is None:
        return "default"
    if cfg.dense:
        return "dense (decode_weight + cuBLAS)"
    s = f"bm{cfg.block_m} bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
    for flag, label in ((cfg.split_k > 1, f"split{cfg.split_k}"), (cfg.fixup, "fixup"), (cfg.asm_decode, "asm"),
                        (cfg.planar_x, "planar"), (cfg.prefetch, "prefetch")):
        if flag:
            s += " " + label
    return s


def correctness() -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    # Every byte value through the PTX decode, bf16 and fp16 (K = 5, x = I: y.T is W itself).
    every = torch.arange(243, dtype=torch.uint8, device=DEV).reshape(243, 1)
    e = torch.randint(-128, 128, (243,), generator=gen, device=DEV).to(torch.int8)
    for dt in (torch.bfloat16, torch.float16):
        y = tk.ternary_matmul(torch.eye(5, device=DEV, dtype=dt), every, e, 5, config=C(16, 64, 64, asm_decode=True))
        ok = torch.equal(y.t().cpu(), packing.decode(every.cpu(), e.cpu(), 5, dt))
        ROWS.append({"kind": "check", "what": f"asm decode, all 243 bytes, {dt}", "ok": ok})
        d = tk.decode_weight(every, e, 5, dt)
        ROWS.append({"kind": "check", "what": f"decode_weight all 243 bytes {dt} bit-exact",
                     "ok": torch.equal(d.cpu(), packing.decode(every.cpu(), e.cpu(), 5, dt))})
    small = [C(16, 64, 64, split_k=8, fixup=True, asm_decode=True), C(16, 128, 64, 8, split_k=4, fixup=True, asm_decode=True),
             C(16, 64, 32, split_k=3, fixup=True), None]
    for m, k, n in ((1, KN, KN), (16, KN, KN), (3, 1001, 515), (64, 2050, 1536), (16, 37, 19)):
        packed, exponent = weight(n, k, gen)
        w = packing.decode(packed, exponent, k, torch.float64)
        dd = tk.decode_weight(packed, exponent, k, torch.bfloat16)
        ROWS.append({"kind": "check", "what": f"decode_weight bf16 {n}x{k} bit-exact",
                     "ok": torch.equal(dd, packing.decode(packed, exponent, k, torch.bfloat16))})
        for cfg in small:
            for rep in range(2):  # fresh x each time
                x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
                err = rel_err(tk.ternary_matmul(x, packed, exponent, k, config=cfg), x.double() @ w.t())
                ROWS.append({"kind": "check", "what": f"forward bf16 M={m} K={k} N={n} {name(cfg)} rep{rep}",
                             "rel_err": err, "ok": err < 3e-3})
    for m, k, n in ((300, 1001, 515), (2048, 2050, 1536)):
        packed, exponent = weight(n, k, gen)
        w = packing.decode(packed, exponent, k, torch.float64)
        x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
        gy = torch.randn(m, n, generator=gen, device=DEV).to(torch.bfloat16)
        cfg = C(128, 128, 32, dense=True)
        for what, got, ref in (("forward", tk.ternary_matmul(x, packed, exponent, k, config=cfg), x.double() @ w.t()),
                               ("grad_input", tk.ternary_matmul_grad_input(gy, packed, exponent, k, config=cfg),
                                gy.double() @ w)):
            err = rel_err(got, ref)
            ROWS.append({"kind": "check", "what": f"dense {what} bf16 M={m} K={k} N={n}", "rel_err": err,
                         "ok": err < 3e-3})
    for r in ROWS:
        log(str(r))


def timed(op: str, m: int, label: str, fn, ref, base_ms: float | None) -> float | None:
    row = {"kind": "time", "op": op, "M": m, "config": label}
    try:
        out = fn()
        if ref is not None:
            row["rel_err_vs_fp32"] = rel_err(out, ref)
        del out
        row["ms"] = bench(fn)
        if base_ms:
            row["speedup_vs_cublas"] = base_ms / row["ms"]
    except Exception:
        row["error"] = traceback.format_exc()[-600:]
        ERRORS.append(f"{op} M={m} {label}: {row['error']}")
    ROWS.append(row)
    log(str({k: v for k, v in row.items() if k != "error"}))
    return row.get("ms")


def timings() -> None:
    gen = torch.Generator(device=DEV).manual_seed(2)
    packed, exponent = weight(KN, KN, gen)
    w = packing.decode(packed, exponent, KN, torch.bfloat16)
    # ---- M = 16 forward
    x = torch.randn(16, KN, generator=gen, device=DEV).to(torch.bfloat16)
    ref = x.float() @ w.float().t()
    base = timed("forward", 16, "cuBLAS bf16 x @ W.T", lambda: x @ w.t(), ref, None)
    variants = [None, C(16, 64, 32, split_k=10), C(16, 64, 32, split_k=10, fixup=True, asm_decode=True),
                C(16, 64, 32, split_k=6, fixup=True, asm_decode=True), C(16, 64, 32, split_k=14, fixup=True, asm_decode=True),
                C(16, 64, 16, split_k=10, fixup=True, asm_decode=True), C(16, 64, 16, split_k=20, fixup=True, asm_decode=True),
                C(16, 128, 32, 4, split_k=10, fixup=True, asm_decode=True), C(16, 128, 32, 8, split_k=10, fixup=True, asm_decode=True),
                C(16, 64, 64, split_k=8, fixup=True, asm_decode=True), C(16, 64, 32, 4, 1, split_k=10, fixup=True, asm_decode=True),
                C(16, 64, 32, 2, split_k=10, fixup=True, asm_decode=True), C(16, 64, 32, split_k=10, fixup=True),
                None]
    for cfg in variants:
        timed("forward", 16, name(cfg), lambda: tk.ternary_matmul(x, packed, exponent, KN, config=cfg), ref, base)
    timed("forward", 16, "cuBLAS bf16 x @ W.T (again)", lambda: x @ w.t(), None, base)
    # ---- large M
    for m in (64, 128, 256, 8192):
        x = torch.randn(m, KN, generator=gen, device=DEV).to(torch.bfloat16)
        gy = torch.randn(m, KN, generator=gen, device=DEV).to(torch.bfloat16)
        big = m == 8192
        ref = x.float() @ w.float().t() if big else None
        base = timed("forward", m, "cuBLAS bf16 x @ W.T", lambda: x @ w.t(), ref, None)
        timed("forward", m, "default", lambda: tk.ternary_matmul(x, packed, exponent, KN), ref, base)
        timed("forward", m, "dense (decode_weight + cuBLAS)",
              lambda: tk.ternary_matmul(x, packed, exponent, KN, config=C(128, 128, 32, dense=True)), ref, base)
        timed("forward", m, "fused bm128 bn128 bk32 w8 s3 planar (old default)",
              lambda: tk.ternary_matmul(x, packed, exponent, KN, config=C(128, 128, 32, 8, 3, planar_x=True)), ref, base)
        if big:
            wt = w.t().contiguous()
            timed("forward", m, "cuBLAS bf16 x @ Wt (W^T stored [K, N])", lambda: x @ wt, None, base)
            del wt
            timed("decode", m, "decode_weight alone (bf16, 10.3 MB in, 102.8 MB out)",
                  lambda: tk.decode_weight(packed, exponent, KN, torch.bfloat16), None, None)
        del ref
        ref = gy.float() @ w.float() if big else None
        base = timed("grad_input", m, "cuBLAS bf16 gy @ W", lambda: gy @ w, ref, None)
        timed("grad_input", m, "default", lambda: tk.ternary_matmul_grad_input(gy, packed, exponent, KN), ref, base)
        timed("grad_input", m, "dense (decode_weight + cuBLAS)",
              lambda: tk.ternary_matmul_grad_input(gy, packed, exponent, KN, config=C(128, 128, 32, dense=True)), ref, base)
        timed("grad_input", m, "fused bm128 bn128 bk32 w8 s3 (old default)",
              lambda: tk.ternary_matmul_grad_input(gy, packed, exponent, KN, config=C(128, 128, 32, 8, 3)), ref, base)
        if big:
            del ref
            ref = gy.float().t() @ x.float()
            base = timed("weight_grad", m, "cuBLAS bf16 gy.T @ x (fp32 out)",
                         lambda: torch.mm(gy.t(), x, out_dtype=torch.float32), ref, None)
            timed("weight_grad", m, "default", lambda: tk.weight_grad(gy, x), ref, base)
        del x, gy, ref
        torch.cuda.empty_cache()


def main() -> int:
    props = torch.cuda.get_device_properties(DEV)
    log(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    for stage in (correctness, timings):
        try:
            stage()
        except Exception:
            ERRORS.append(f"{stage.__name__}: {traceback.format_exc()}")
            log(ERRORS[-1])
    print("\n| op | M | config | ms | vs cuBLAS | rel err vs fp32 |\n| --- | ---: | --- | ---: | ---: | ---: |")
    for r in ROWS:
        if r["kind"] == "time":
            sp = r.get("speedup_vs_cublas")
            print(f"| {r['op']} | {r['M']} | {r['config']} | {r.get('ms', float('nan')):.4f} | "
                  f"{'' if sp is None else f'{sp:.2f}x'} | {r.get('rel_err_vs_fp32', float('nan')):.1e} |")
    bad = [r["what"] for r in ROWS if r["kind"] == "check" and not r["ok"]]
    print(f"\nchecks: {sum(r['kind'] == 'check' for r in ROWS)} run, failed: {bad}")
    for e in ERRORS:
        print("ERROR", e)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_gemm_sweep.json"), "w") as f:
            json.dump({"device": props.name, "rows": ROWS, "errors": ERRORS}, f, indent=1, default=str)
    log("done")
    return 0 if not bad and not ERRORS else 1


if __name__ == "__main__":
    sys.exit(main())
