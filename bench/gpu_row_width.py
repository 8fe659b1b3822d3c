"""How wide a row the touched-row kernel (triton_update.apply_votes_rows) should take.

    python bench/gpu_row_width.py [--widths 16 64 256 1024] [--rows 1024] [--timeout 60]

The kernel holds BLOCK_R whole rows in registers, which suits codebook rows (64 trits). Votes
mode sent whole matrices of every width through it, and at 1,024+ trits one compile ran for
minutes (bench/RESULTS.md). For each width, in a subprocess of its own (so that a compile that
runs away costs only --timeout seconds): the first call's time (compile included), then the
kernel's and the torch rule's median time on a whole rows x width matrix of votes, and whether
the two give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")


def one_width(cols: int, rows: int) -> dict:
    import torch
    sys.path.insert(0, ROOT)
    from arbd.ternary import packing
    from arbd.ternary.rule import TUNED_RULE, apply_votes
    from arbd.ternary.state import TernaryMatrix
    from arbd.ternary.triton_update import apply_votes_rows
    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_update import event_median_ms

    gen = torch.Generator().manual_seed(cols)
    m = TernaryMatrix(rows, cols, generator=gen)
    m.t_accum.copy_(torch.randint(-100, 101, m.t_accum.shape, generator=gen).to(torch.int8))
    m = m.to("cuda")
    votes = torch.randint(-9, 10, (rows, cols), generator=gen, dtype=torch.int32).cuda()
    ev = torch.randint(-9, 10, (rows,), generator=gen, dtype=torch.int32).cuda()
    ids = torch.arange(rows, device="cuda")
    bufs = (m.packed, m.t_accum, m.exponent, m.e_accum)
    start = [b.clone() for b in bufs]

    def reset():
        for b, s in zip(bufs, start):
            b.copy_(s)

    def kernel():
        apply_votes_rows(*bufs, ids, votes, ev, TUNED_RULE)

    def torch_rule():
        trits, t, e, ea, _ = apply_votes(packing.unpack_trits(m.packed, cols), m.t_accum,
                                         m.exponent, m.e_accum, votes, ev, TUNED_RULE)
        m.packed.copy_(packing.pack_trits(trits))
        m.t_accum.copy_(t)
        m.exponent.copy_(e)
        m.e_accum.copy_(ea)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kernel()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    reset()
    kernel()
    got = [b.clone() for b in bufs]
    reset()
    torch_rule()
    same = all(torch.equal(a, b) for a, b in zip(got, bufs))
    return {"cols": cols, "rows": rows, "first_call_s": round(first_s, 2), "equal": same,
            "kernel_ms": event_median_ms(kernel, before=reset),
            "torch_ms": event_median_ms(torch_rule, before=reset)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=int, nargs="+",
                   default=[16, 48, 64, 128, 192, 256, 384, 464, 640, 1024])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(one_width(a.one, a.rows)))
        return
    print(f"{'cols':>5} {'first call s':>12} {'kernel ms':>9} {'torch ms':>8} {'torch/kernel':>12} equal")
    for cols in a.widths:
        try:
            r = subprocess.run([sys.executable, __file__, "--one", str(cols), "--rows", str(a.rows)],
                               capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"{cols:>5} {'> %.0f' % a.timeout:>12}  (compile did not finish)")
            continue
        if r.returncode != 0:
            print(f"{cols:>5} failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{cols:>5} {d['first_call_s']:>12.2f} {d['kernel_ms']:>9.4f} {d['torch_ms']:>8.4f} "
              f"{d['torch_ms'] / d['kernel_ms']:>11.2f}x {d['equal']}")


if __name__ == "__main__":
    main()
