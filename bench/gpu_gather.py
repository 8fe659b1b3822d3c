"""Packed-row gather on the GPU: triton_lookup.gather_rows against torch, side by side.

    python bench/gpu_gather.py --json runs/gpu_gather.json

A table of R rows (uint8, 16 or 13 bytes a row, random bytes), n random int64 ids (uniform over
the table, so rows come from HBM, not L2: 160 MB table against 50 MB of L2). Checks every gather
against table[ids] on fresh inputs, then times with triton.testing.do_bench (median, L2 flushed).
G rows/s = n / time. Bytes moved per row: 8 (id) + W (row read) + W (row written); the HBM
traffic is larger, since a random row costs a whole 32-byte sector.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from arbd.vq.triton_lookup import gather_rows  # noqa: E402


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--n", default="1048576,16777216")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    out: dict = {"rows": args.rows, "device": torch.cuda.get_device_name(), "checks": {}, "times": []}
    for width in (16, 13):
        table = torch.randint(0, 243, (args.rows, width), device=dev, generator=g, dtype=torch.uint8)
        for n in [int(v) for v in args.n.split(",")]:
            ids = torch.randint(0, args.rows, (n,), device=dev, generator=g)
            ok = torch.equal(gather_rows(table, ids), table[ids])
            ragged = ids[: n - 77].view(-1)            # a length that is no multiple of any block
            ok = ok and torch.equal(gather_rows(table, ragged), table[ragged])
            out["checks"][f"W={width} n={n}"] = bool(ok)
            row = {"W": width, "n": n,
                   "torch_index_select_ms": bench(lambda: table.index_select(0, ids)),
                   "torch_getitem_ms": bench(lambda: table[ids])}
            if width % 8 == 0:
                wide = table.view(torch.int64)
                row["torch_index_select_int64_view_ms"] = bench(lambda: wide.index_select(0, ids))
            for block, warps in ((128, 4), (256, 4), (512, 8), (1024, 8)):
                row[f"triton_b{block}_w{warps}_ms"] = bench(
                    lambda: gather_rows(table, ids, block=block, num_warps=warps))
            best = min(v for k, v in row.items() if k.startswith("triton"))
            row["triton_best_ms"] = best
            row["triton_G_rows_per_s"] = n / best / 1e6
            row["torch_G_rows_per_s"] = n / row["torch_index_select_ms"] / 1e6
            row["speedup_vs_index_select"] = row["torch_index_select_ms"] / best
            row["payload_GB_per_s"] = n * (8 + 2 * width) / best / 1e6
            out["times"].append(row)
            print(row, flush=True)
        del table
    print("checks:", out["checks"])
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
