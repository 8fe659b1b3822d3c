"""Candidate lookup on the GPU: the fused Triton kernel against the torch stages, side by side.

    python bench/gpu_vq_lookup.py --json runs/gpu_vq_lookup.json

Builds a 10M x 64 codebook on the GPU, checks that the Triton path picks the same ids as the
torch path (GPU) and as the CPU, then times one 16,384-query lookup batch per candidate_count with
triton.testing.do_bench (median, L2 flushed between repetitions; "b2b" columns: back-to-back replays, no flush, as
bench/vq_quality.py timed the first table). Both paths are timed as CUDA
graphs of `codebook.lookup` (check_finite off, so no host sync), the torch one with
ARBD_VQ_TRITON=0 at capture time. "kernel" rows time the fused kernel alone (no graph).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from arbd.vq import lookup, triton_lookup  # noqa: E402
from arbd.vq.codebook import TernaryVQCodebook  # noqa: E402
from bench.vq_quality import graph_lookup  # noqa: E402


def queries(cb: TernaryVQCodebook, n: int, seed: int) -> torch.Tensor:
    """Half near-row queries (a row + 0.35 sigma noise), half Gaussian: never zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.randint(0, cb.num_codes, (n // 2,), generator=g).to(cb.usage.device)
    near = cb.decode_rows(rows)
    near = near + 0.35 * near.std() * torch.randn(near.shape, generator=g).to(near.device)
    far = torch.randn(n - n // 2, cb.dim, generator=g).to(near.device)
    return torch.cat([near, far])


def graphed(cb: TernaryVQCodebook, x: torch.Tensor, triton_on: bool):
    """CUDA graph of one lookup; the path is fixed at capture by ARBD_VQ_TRITON."""
    os.environ["ARBD_VQ_TRITON"] = "1" if triton_on else "0"
    try:
        replay, out = graph_lookup(cb, x)
        torch.cuda.synchronize()
        return replay, out
    finally:
        os.environ.pop("ARBD_VQ_TRITON", None)


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def back_to_back(fn, reps: int = 100) -> float:
    """Mean ms of reps calls in a row, L2 not flushed (how RESULTS.md's first lookup table was
    timed, bench/vq_quality.py's time_it)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--queries", type=int, default=16_384)
    p.add_argument("--candidates", default="16,32,64,100,128")
    p.add_argument("--cpu-check", type=int, default=1024, help="queries also looked up on CPU")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    # max_chunk_bytes 1 GiB: the torch path then runs each batch in one block, as in
    # bench/vq_quality.py on CUDA (the 64 MiB default splits it into 9 blocks, 2.7x slower).
    cb = TernaryVQCodebook(args.rows, 64, candidate_count=64, exact_max=0, check_finite=False,
                           max_chunk_bytes=1 << 30, device=dev)
    build_s = time.perf_counter() - t0
    x = queries(cb, args.queries, seed=1)
    x2 = queries(cb, args.queries, seed=2)
    res: dict = {"rows": args.rows, "queries": args.queries, "build_s": round(build_s, 1),
                 "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": triton.__version__, "checks": {}, "times": []}
    m = cb.matrix
    # -- correctness: Triton vs torch on the GPU (every count), vs CPU at the default -----------
    for c in [int(v) for v in args.candidates.split(",")]:
        cb.candidate_count = c
        for xs in (x, x2):
            xq, unit = lookup.quantize_queries(xs)
            cfg = lookup.triton_plan(xq, cb.hasher, cb.layout, c)
            ti, tv = lookup.candidate_ids(xq, cb.hasher, cb.layout, c, use_triton=True)
            ri, rv = lookup.candidate_ids(xq, cb.hasher, cb.layout, c, use_triton=False)
            tb, _ = lookup.candidate_search(xq, unit, m.packed, m.exponent, 64, cb.hasher,
                                            cb.layout, c, 1 << 30, use_triton=True)
            rb, _ = lookup.candidate_search(xq, unit, m.packed, m.exponent, 64, cb.hasher,
                                            cb.layout, c, 1 << 30, use_triton=False)
            fused = triton_lookup.candidate_search(xs, None, m.packed, m.exponent, cb.hasher,
                                                   cb.layout, cfg, quantize=True)
            ok = (cfg is not None and torch.equal(ti, ri) and torch.equal(tv, rv)
                  and torch.equal(tb, rb) and torch.equal(fused, rb))
            res["checks"][f"C={c}"] = res["checks"].get(f"C={c}", True) and bool(ok)
    cb.candidate_count = 64
    k = args.cpu_check
    gpu_ids = cb.lookup(x[:k])
    xq_c, unit_c = lookup.quantize_queries(x[:k].cpu())
    cpu_ids, _ = lookup.candidate_search(xq_c, unit_c, m.packed.cpu(), m.exponent.cpu(), 64,
                                         cb.hasher, cb.layout, 64, 64 << 20)
    res["checks"]["cpu_equal"] = bool(torch.equal(cpu_ids, gpu_ids.cpu()))
    print("checks:", res["checks"], flush=True)
    # -- timing --------------------------------------------------------------------------------
    for c in [int(v) for v in args.candidates.split(",")]:
        cb.candidate_count = c
        row = {"C": c}
        replay_t, out_t = graphed(cb, x, False)
        row["torch_graph_ms"] = bench(replay_t)
        row["torch_graph_b2b_ms"] = back_to_back(replay_t)
        replay_f, out_f = graphed(cb, x, True)
        row["triton_graph_ms"] = bench(replay_f)
        row["triton_graph_b2b_ms"] = back_to_back(replay_f)
        row["same_ids"] = bool(torch.equal(out_t, out_f))
        xq, unit = lookup.quantize_queries(x)
        cfg = lookup.triton_plan(xq, cb.hasher, cb.layout, c)
        if c == 64:
            row["quantize_ms"] = bench(lambda: lookup.quantize_queries(x))
            for w in (1, 2, 4, 8):
                row[f"kernel_w{w}_ms"] = bench(lambda: triton_lookup.candidate_search(
                    x, None, m.packed, m.exponent, cb.hasher, cb.layout, cfg, quantize=True,
                    num_warps=w))
            row["ids_only_ms"] = bench(lambda: triton_lookup.candidate_ids(
                xq, cb.hasher, cb.layout, c, cfg))
        row["speedup"] = row["torch_graph_ms"] / row["triton_graph_ms"]
        res["times"].append(row)
        print(row, flush=True)
        del replay_t, replay_f
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
