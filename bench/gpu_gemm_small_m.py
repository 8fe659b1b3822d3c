#!/usr/bin/env python3
"""Small-M packed-ternary forward (y = x W^T, M <= 32) against cuBLAS bf16, timed in CUDA graphs.

Checks first (each configuration on fresh random x, outputs poisoned with NaN, against a float64
reference), then timings: every candidate is captured in a CUDA graph of CALLS back-to-back calls
that cycle through W_COPIES copies of the packed weight (82 MB, more than the 50 MB L2, so the
weight comes from DRAM as it would in a model), replayed REPLAYS times; candidates and cuBLAS are
interleaved, ROUNDS times, after a warm-up that runs cuBLAS for a couple of seconds (clocks up).
Reported: the median per-call time over rounds, and cuBLAS median / ours.

    PYTHONUNBUFFERED=1 python3 bench/gpu_gemm_small_m.py --sweep 3 --ms 16 1 32   # JSON to $OUT if set
    NCU_RUN=1 ncu --clock-control none -k regex:small_m_kernel --set full -o prof \
        python3 bench/gpu_gemm_small_m.py --profile      # without ncu: per-kernel times (torch.profiler)

--sweep 1 / 2 / 3 pick the candidate lists of the three runs in bench/RESULTS.md (wgmma shapes;
mma.sync shapes; register caps and more splits); --sweep 4 the CUDA kernel (csrc/small_m.cu);
--sweep 5 the CUDA kernel on the tile-major copy of W (every compiled variant, probes included) and
the cost of making that copy; --sweep 0 (bench/run_gpu.sh) only the two paths a user can pick:
ternary_matmul's default and the tiled kernel's default variant (ARBD_CUDA_SMALL_M=tiled).
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
import triton  # noqa: E402

from arbd.ternary import cuda_small_m, packing  # noqa: E402
from arbd.ternary import triton_kernels as tk  # noqa: E402
from arbd.ternary.triton_kernels import TileConfig as C  # noqa: E402
from bench.gpu_gemm_sweep import log, rel_err, weight  # noqa: E402 - the sweep's own helpers

DEV = torch.device("cuda")
KN = 7168
W_COPIES, CALLS, REPLAYS = 8, 32, 10


def small(bn: int, bk: int, warps: int, stages: int, split: int, mp: int = 16, align: int = 16,
          planar: bool = True, maxnreg: int | None = None) -> C:
    return C(mp, bn, bk, num_warps=warps, num_stages=stages, split_k=split, planar_x=planar,
             asm_decode=True, small_m=True, align=align, maxnreg=maxnreg)


def cuda(r: int, warps: int, splits: int, flags: int = 0) -> tuple:
    """A CUDA small-M kernel candidate (arbd/ternary/csrc/small_m.cu); flags (the kernel's phase
    switches: 1 no split-K sums or output, 2 no MMA loop, 4 no x staging, 8 no W loads) time it with
    parts left out (no valid output)."""
    return ("cuda", r, warps, splits, flags)


def tiled(r: int, wn: int, wk: int, d: int, fl: int = 0, pdl: bool = True) -> tuple:
    """A candidate of the CUDA kernel on the tile-major copy of W (tiled_kernel; cuda_small_m.tiled_copy
    makes the copy once per weight, outside the timed graphs)."""
    return ("tiled", r, wn, wk, d, fl, pdl)


def phase_only(cfg) -> bool:
    return isinstance(cfg, tuple) and bool(cfg[4] if cfg[0] == "cuda" else cfg[5] & 3)


def name(cfg, decode: int = 2) -> str:
    if cfg is None:
        return "default"
    if isinstance(cfg, tuple) and cfg[0] == "tiled":
        return (f"CUDA tiled R{cfg[1]} WN{cfg[2]} WK{cfg[3]} D{cfg[4]}" + (" L2-prefetch" if cfg[5] & 4 else "")
                + (f" probe {cfg[5] & 3}" if cfg[5] & 3 else "")
                + ("" if cfg[6] else " no PDL"))
    if isinstance(cfg, tuple):
        return f"CUDA r{cfg[1]} w{cfg[2]} split{cfg[3]}" + (f" phase-flags {cfg[4]}" if cfg[4] else "")
    if not cfg.small_m:
        return f"old fused bn{cfg.block_n} bk{cfg.block_k} split{cfg.split_k}"
    s = f"small bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} split{cfg.split_k} a{cfg.align}"
    if cfg.maxnreg:
        s += f" maxnreg{cfg.maxnreg}"
    if not cfg.planar_x:
        s += " gather-x"
    if decode != 2:
        s += f" decode{decode}"
    return s


def run(x, packed, exponent, k, cfg, decode=2, out=None):
    if isinstance(cfg, tuple) and cfg[0] == "tiled":
        return cuda_small_m.tiled_matmul(x, cuda_small_m.tiled_copy(packed, k), exponent, packed.shape[0], k,
                                         variant=cfg[1:6], pdl=cfg[6], out=out)
    if isinstance(cfg, tuple):
        return cuda_small_m.small_m_matmul(x, packed, exponent, k, shape=cfg[1:4], out=out, _flags=cfg[4])
    if cfg is not None and cfg.small_m:
        return tk._small_m_matmul(x, packed, exponent, k, cfg, out=out, decode=decode)
    return tk.ternary_matmul(x, packed, exponent, k, config=cfg)


def checks(variants, rows: list) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    # All 243 byte values through the new decode (K = 5, x = I: y.T is W itself), bit for bit.
    every = torch.arange(243, dtype=torch.uint8, device=DEV).reshape(243, 1)
    e = torch.randint(-128, 128, (243,), generator=gen, device=DEV).to(torch.int8)
    for dt in (torch.bfloat16, torch.float16):
        for cfg in (small(64, 64, 4, 3, 1), small(64, 64, 4, 3, 2), cuda(2, 8, 1), cuda(1, 8, 1),
                    tiled(2, 1, 8, 2, 4), tiled(2, 1, 8, 2), tiled(1, 2, 8, 2, 4), tiled(4, 1, 8, 2, 4)):
            y = run(torch.eye(5, device=DEV, dtype=dt), every, e, 5, cfg)
            ok = torch.equal(y.t().cpu(), packing.decode(every.cpu(), e.cpu(), 5, dt))
            rows.append({"kind": "check", "what": f"all 243 bytes {dt} {name(cfg)}", "ok": ok})
    shapes = [(16, KN, KN), (3, 1001, 515), (16, 173, 40), (1, 37, 19), (13, 4096, 1000)]
    weights = {s[1:]: weight(s[2], s[1], gen) for s in shapes}
    refs = {key: packing.decode(p, ex, key[0], torch.float64) for key, (p, ex) in weights.items()}
    for cfg, decode in variants:
        if cfg is None or (not isinstance(cfg, tuple) and not cfg.small_m) or phase_only(cfg):
            continue
        block_m = 16 if isinstance(cfg, tuple) else cfg.block_m
        for m, k, n in shapes:
            packed, exponent = weights[(k, n)]
            for dt in ((torch.bfloat16, torch.float16) if n == 40 else (torch.bfloat16,)):
                for rep in range(2 if n == 515 else 1):
                    mm = min(m + rep, block_m)
                    x = torch.randn(mm, k, generator=gen, device=DEV).to(dt)
                    out = torch.full((mm, n), float("nan"), dtype=dt, device=DEV)
                    y = run(x, packed, exponent, k, cfg, decode, out=out)
                    err = rel_err(y, x.double() @ refs[(k, n)].t())
                    ok = err < 3e-3 and not torch.isnan(y).any().item()
                    rows.append({"kind": "check", "what": f"{name(cfg, decode)} {dt} M={mm} K={k} N={n}",
                                 "rel_err": err, "ok": ok})
                    if not ok:
                        log(f"CHECK FAILED {rows[-1]}")
    log(f"checks: {sum(r['ok'] for r in rows if r['kind'] == 'check')} / "
        f"{sum(r['kind'] == 'check' for r in rows)} passed")


class Graph:
    """CALLS calls of fn(i) captured once; time() replays them and returns ms per call."""

    def __init__(self, fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(CALLS):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outs = [fn(i) for i in range(CALLS)]
        torch.cuda.synchronize()

    def time(self) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(REPLAYS):
            self.graph.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / (REPLAYS * CALLS)


def timings(m: int, variants, rows: list, rounds: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(2)
    packs = [weight(KN, KN, gen) for _ in range(W_COPIES)]
    wd = [packing.decode(p, e, KN, torch.bfloat16) for p, e in packs[:2]]
    x = torch.randn(m, KN, generator=gen, device=DEV).to(torch.bfloat16)
    refs = [x.double() @ packing.decode(p, e, KN, torch.float64).t() for p, e in packs]
    graphs = {"cuBLAS bf16 x @ W.T": Graph(lambda i: x @ wd[i % 2].t())}
    for cfg, decode in variants:
        label = name(cfg, decode)
        try:
            g = Graph(lambda i, cfg=cfg, decode=decode: run(x, *packs[i % W_COPIES], KN, cfg, decode))
            g.graph.replay()
            torch.cuda.synchronize()
            graphs[label] = g
            if phase_only(cfg):
                continue  # a phase-timing variant: no valid output to check
            errs = [rel_err(g.outs[i], refs[i % W_COPIES]) for i in (0, CALLS - 1)]
            rows.append({"kind": "graph-check", "M": m, "config": label, "rel_err": max(errs),
                         "ok": max(errs) < 3e-3})
        except Exception:
            rows.append({"kind": "error", "M": m, "config": label, "error": traceback.format_exc()[-800:]})
            log(f"ERROR {label}: {rows[-1]['error']}")
    # Warm-up: clocks up before anything is measured.
    t_end = time.time() + 2.0
    while time.time() < t_end:
        graphs["cuBLAS bf16 x @ W.T"].time()
    times: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(rounds):
        for label, g in graphs.items():
            times[label].append(g.time())
    base = statistics.median(times["cuBLAS bf16 x @ W.T"])
    for label, ts in times.items():
        med = statistics.median(ts)
        rows.append({"kind": "time", "M": m, "config": label, "ms": med, "min_ms": min(ts), "max_ms": max(ts),
                     "speedup_vs_cublas": base / med, "rounds": ts})
    log(f"M={m}: timed {len(graphs)} graphs x {rounds} rounds")
    del graphs
    torch.cuda.empty_cache()


SWEEP16 = [
    (None, 2),  # ternary_matmul's default
    (C(16, 64, 32, num_warps=4, num_stages=3, split_k=10, fixup=True, asm_decode=True), 2),  # old default
    (small(64, 64, 4, 3, 1), 2), (small(64, 64, 4, 3, 2), 2), (small(64, 64, 4, 3, 3), 2),
    (small(64, 64, 4, 3, 4), 2),
    (small(64, 64, 4, 4, 3), 2), (small(64, 32, 4, 4, 3), 2), (small(64, 128, 4, 3, 2), 2),
    (small(128, 64, 8, 3, 2), 2), (small(128, 64, 8, 3, 3), 2), (small(128, 64, 8, 3, 4), 2),
    (small(128, 64, 8, 3, 6), 2),
    (small(128, 32, 8, 4, 4), 2),
    (small(256, 32, 8, 3, 4), 2), (small(256, 32, 8, 3, 8), 2), (small(256, 64, 8, 3, 6), 2),
    (small(32, 64, 2, 3, 2), 2), (small(32, 64, 2, 3, 4), 2), (small(16, 64, 1, 3, 4), 2),
    (small(64, 64, 4, 3, 3, planar=False), 2), (small(64, 64, 4, 3, 3), 1),  # gather-x; old decode
    (small(128, 64, 8, 3, 4, align=4), 2),
]


# Second sweep: mma.sync shapes (num_warps not a multiple of 4 keeps Triton off wgmma), next to the
# best wgmma shape of the first.
SWEEP16_2 = [
    (None, 2),
    (C(16, 64, 32, num_warps=4, num_stages=3, split_k=10, fixup=True, asm_decode=True), 2),  # old default
    (small(64, 64, 4, 3, 2), 2),
    (small(64, 32, 2, 3, 2), 2), (small(64, 32, 2, 3, 3), 2), (small(64, 32, 2, 3, 4), 2), (small(64, 32, 2, 4, 3), 2),
    (small(64, 64, 2, 3, 2), 2), (small(64, 64, 2, 3, 3), 2), (small(128, 32, 2, 3, 2), 2), (small(128, 32, 2, 3, 4), 2),
    (small(64, 32, 1, 3, 4), 2), (small(32, 64, 1, 3, 4), 2), (small(32, 32, 1, 4, 6), 2),
    (small(64, 32, 2, 3, 3), 1),
]
# Third sweep: more programs per SM (register cap, fewer stages, more splits).
SWEEP16_3 = [
    (None, 2),
    (C(16, 64, 32, num_warps=4, num_stages=3, split_k=10, fixup=True, asm_decode=True), 2),  # old default
    (small(64, 64, 4, 3, 2), 2), (small(64, 64, 4, 3, 3), 2),
    (small(64, 64, 4, 3, 3, maxnreg=96), 2), (small(64, 64, 4, 3, 4, maxnreg=96), 2),
    (small(64, 64, 4, 3, 5, maxnreg=96), 2),
    (small(64, 64, 4, 3, 4, maxnreg=80), 2), (small(64, 64, 4, 3, 5, maxnreg=80), 2),
    (small(64, 64, 4, 2, 4, maxnreg=96), 2), (small(64, 32, 4, 3, 7, maxnreg=80), 2),
    (small(64, 32, 4, 4, 5, maxnreg=96), 2),
    (small(64, 32, 2, 3, 8), 2), (small(64, 32, 2, 3, 12), 2), (small(64, 32, 2, 3, 8, maxnreg=64), 2),
]
# Fourth sweep: the CUDA kernel (rows per warp, warps, splits) next to the best Triton shape. At
# K = N = 7168 a row is 90 chunks of 16 bytes (a block takes at most 16, a cluster of splits at most
# 16 blocks); blocks of 128 / 256 rows make 56 / 28 row ranges, so e.g. (1, 8, 7) is 392 blocks.
SWEEP16_4 = [
    (None, 2),  # ternary_matmul's default (the CUDA kernel's default shape where it builds)
    (small(64, 64, 4, 3, 2), 2),  # the Triton small-M kernel's best shape
    *[(cuda(r, w, s), 2) for r, w, s in ((1, 8, 6), (1, 8, 7), (1, 8, 8), (1, 8, 12), (2, 4, 7), (2, 8, 8),
                                         (2, 8, 12), (2, 8, 16), (4, 4, 8), (4, 4, 12))],
    *[(cuda(2, 8, 8, flags), 2) for flags in (1, 2, 3, 3 | 4, 3 | 8, 3 | 4 | 8, 4, 8)],
]
# Fifth sweep: the CUDA kernel on the tile-major copy, every compiled variant (filled in at run time),
# next to the Triton default and the best row-major CUDA shape.
SWEEP16_5 = [(None, 2), (small(64, 64, 4, 3, 2), 2), (cuda(2, 8, 8), 2)]
# The GPU suite's pair: what ternary_matmul runs by default, and the tiled kernel as it ships.
SUITE = [(None, 2), (tiled(*cuda_small_m.DEFAULT_TILED), 2)]
PROFILE = [small(64, 64, 4, 3, 2), small(64, 32, 2, 3, 3)]


def profile() -> None:
    """A few calls of each PROFILE config, for ncu (-k regex:small_m); then per-kernel times from
    torch.profiler for the same calls (the three launches of one call, separately)."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    packed, exponent = weight(KN, KN, gen)
    x = torch.randn(16, KN, generator=gen, device=DEV).to(torch.bfloat16)
    for cfg in PROFILE:
        for _ in range(2):
            run(x, packed, exponent, KN, cfg)
    torch.cuda.synchronize()
    if os.environ.get("NCU_RUN"):
        return
    packs = [weight(KN, KN, gen) for _ in range(W_COPIES)]
    from torch.profiler import ProfilerActivity, profile as tprofile
    for cfg in PROFILE + [SWEEP16_2[1][0]]:
        for i in range(W_COPIES):
            run(x, *packs[i], KN, cfg)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(W_COPIES):
                run(x, *packs[i], KN, cfg)
            torch.cuda.synchronize()
        per: dict[str, list[float]] = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                per.setdefault(ev.name[:40], []).append(ev.time_range.elapsed_us())
        log(f"kernel times (us, median of {W_COPIES}) {name(cfg)}: "
            + ", ".join(f"{k}: {statistics.median(v):.1f}" for k, v in per.items()))


def conversion(rows: list) -> None:
    """What making the tile-major copy of one 7168 x 7168 weight costs (torch ops, once per weight
    version), and its size against the packed rows."""
    gen = torch.Generator(device=DEV).manual_seed(4)
    packed, _ = weight(KN, KN, gen)
    cuda_small_m.tile_major(packed, KN)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        t = cuda_small_m.tile_major(packed, KN)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 5 * 1e3
    rows.append({"kind": "conversion", "ms": ms, "tiled_bytes": t.numel() * 4, "packed_bytes": packed.numel()})
    log(f"tile_major 7168 x 7168: {ms:.2f} ms, {t.numel() * 4} bytes (packed {packed.numel()})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ms", type=int, nargs="*", default=[16, 1, 32])
    ap.add_argument("--sweep", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(DEV)
    log(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    if args.profile:
        profile()
        return 0
    sweep = {0: SUITE, 1: SWEEP16, 2: SWEEP16_2, 3: SWEEP16_3, 4: SWEEP16_4, 5: SWEEP16_5}[args.sweep]
    rows: list = []
    if args.sweep in (0, 5):
        conversion(rows)
    if args.sweep == 5:
        sweep = sweep + [(tiled(*v, pdl=pdl), 2) for v in cuda_small_m.tiled_variants(DEV, probes=True)
                         for pdl in (True, False)]
    try:
        checks(sweep, rows)
    except Exception:
        rows.append({"kind": "error", "config": "checks", "error": traceback.format_exc()})
        log(rows[-1]["error"])
    for m in args.ms:
        mp = max(16, triton.next_power_of_2(m))
        if m == 16:
            variants = sweep
        elif args.sweep in (0, 5):
            variants = sweep if m <= cuda_small_m.MAX_M else sweep[:2]
        elif args.sweep == 4:
            variants = [(None, 2), (small(64, 64, 4, 3, 2, mp=mp), 2)] + (
                [(cuda(1, 8, 7), 2), (cuda(2, 8, 12), 2)] if m <= cuda_small_m.MAX_M else [])
        else:
            variants = sweep[:2] + [(small(64, 64, 4, 3, 3, mp=mp), 2), (small(64, 64, 4, 3, 4, mp=mp, maxnreg=96), 2)]
        try:
            timings(m, variants, rows, args.rounds)
        except Exception:
            rows.append({"kind": "error", "M": m, "error": traceback.format_exc()})
            log(rows[-1]["error"])
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_gemm_small_m.json"), "w") as f:
            json.dump({"device": props.name, "rows": rows}, f, indent=1, default=str)
    print("\n| M | config | median ms | min | max | cuBLAS / ours |\n| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["kind"] == "time":
            print(f"| {r['M']} | {r['config']} | {r['ms']:.4f} | {r['min_ms']:.4f} | {r['max_ms']:.4f} | "
                  f"{r['speedup_vs_cublas']:.2f}x |")
    bad = [r for r in rows if r["kind"] in ("check", "graph-check") and not r["ok"]]
    errs = [r for r in rows if r["kind"] == "error"]
    n_checks = sum(r["kind"] in ("check", "graph-check") for r in rows)
    print(f"\nchecks: {n_checks} run, {len(bad)} failed; errors: {len(errs)}")
    for r in bad + errs:
        print("FAIL", {k: v for k, v in r.items() if k != "rounds"})
    log("done")
    return 0 if not bad and not errs else 1


if __name__ == "__main__":
    sys.exit(main())
