"""Touched-row codebook updates on the GPU: correctness against the CPU and bandwidth.

    python bench/gpu_update.py --json runs/gpu_update.json

The real tables: the SharedVQ codebook (10,000,000 x 64) and the KG VQ (5,000,000 x 64), built
on the CPU and copied to the GPU. For U touched rows (distinct random ids) the same evidence is
given to both copies and `TernaryMatrix.apply_update(TUNED_RULE)` runs on each:
- integer votes (`set_votes`, what data-parallel training hands over): exact integer arithmetic,
  so the whole GPU state must equal the CPU state byte for byte;
- float evidence (`set_evidence`): the rule's row norms are float sums whose order may differ
  between devices, so the count of rows that differ is reported.
Time: median of CUDA-event timings of apply_update alone (evidence set before each). Bytes it
must move per touched row: evidence read (votes int32 or float32: 4 B x 64 + 4), the row id (8),
and a read and a write of packed trits (13), exponent (1), trit accumulators (64), scale
accumulator (1). Bandwidth is compared with a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from arbd.ternary.rule import TUNED_RULE, apply_votes  # noqa: E402
from arbd.ternary.triton_update import apply_votes_rows  # noqa: E402
from arbd.vq.codebook import TernaryVQCodebook  # noqa: E402

ROW_BYTES = 4 * 64 + 4 + 8 + 2 * (13 + 1 + 64 + 1)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 20)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ts = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return 2 * a.numel() / (sorted(ts[3:])[10] / 1e3)


def timed_update(m, set_evidence, reps: int = 15) -> float:
    ts = []
    for _ in range(reps + 2):
        set_evidence()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        m.apply_update(TUNED_RULE)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts[2:])[reps // 2]


def timed(fn, reps: int = 15) -> float:
    """Median CUDA-event time of fn alone, in ms."""
    ts = []
    for _ in range(reps + 2):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts[2:])[reps // 2]


def same_state(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in
               ((a.packed, b.packed), (a.exponent, b.exponent), (a.t_accum, b.t_accum),
                (a.e_accum, b.e_accum)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--tables", default="10000000,5000000")
    p.add_argument("--touched", default="16384,262144,1048576")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bw = copy_bandwidth()
    out: dict = {"device": torch.cuda.get_device_name(), "copy_TB_per_s": bw / 1e12,
                 "row_bytes": ROW_BYTES, "results": []}
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s", flush=True)
    for rows in [int(v) for v in args.tables.split(",")]:
        cpu = TernaryVQCodebook(rows, 64, exact_max=0, check_finite=False).matrix
        gpu = copy.deepcopy(cpu).cuda()
        for u in [int(v) for v in args.touched.split(",")]:
            g = torch.Generator().manual_seed(u + rows)
            idx = torch.randperm(rows, generator=g)[:u]
            votes = torch.randint(-40, 41, (u, 64), generator=g, dtype=torch.int32)
            e_votes = torch.randint(-20, 21, (u,), generator=g, dtype=torch.int32)
            grad = torch.randn(u, 64, generator=g) * 1e-2
            row = {"rows": rows, "touched": u}
            tri = copy.deepcopy(gpu)
            gi, gv, ge, gg = idx.cuda(), votes.cuda(), e_votes.cuda(), grad.cuda()
            for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
                m.set_votes(idx.to(dev), votes.to(dev), e_votes.to(dev))
                want = m.apply_update(TUNED_RULE)
            row["votes_equal_cpu"] = same_state(cpu, gpu)
            stats = apply_votes_rows(tri.packed, tri.t_accum, tri.exponent, tri.e_accum, gi, gv,
                                     ge, TUNED_RULE)
            row["triton_equal_cpu"] = (same_state(cpu, tri) and stats.tolist()
                                       == [want["trit_flips"], want["scale_moves"]])
            row["triton_ms"] = timed(lambda: apply_votes_rows(
                tri.packed, tri.t_accum, tri.exponent, tri.e_accum, gi, gv, ge, TUNED_RULE))
            for br in (32, 64):
                row[f"triton_block{br}_ms"] = timed(lambda: apply_votes_rows(
                    tri.packed, tri.t_accum, tri.exponent, tri.e_accum, gi, gv, ge, TUNED_RULE,
                    block_r=br))
            del tri
            for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
                m.set_evidence(idx.to(dev), grad.to(dev))
                m.apply_update(TUNED_RULE)
            diff = ((cpu.t_accum[idx] != gpu.t_accum[idx.cuda()].cpu()).any(1)
                    | (cpu.packed[idx] != gpu.packed[idx.cuda()].cpu()).any(1)
                    | (cpu.e_accum[idx] != gpu.e_accum[idx.cuda()].cpu())
                    | (cpu.exponent[idx] != gpu.exponent[idx.cuda()].cpu()))
            row["float_rows_differing"] = int(diff.sum())
            keep = torch.ones(rows, dtype=torch.bool)
            keep[idx] = False                                  # rows without evidence
            row["float_untouched_equal"] = bool(
                torch.equal(cpu.packed[keep], gpu.packed.cpu()[keep])
                and torch.equal(cpu.t_accum[keep], gpu.t_accum.cpu()[keep]))
            row["torch_rewrite_only_ms"] = timed(lambda: gpu._rewrite_rows(
                gi, lambda *st: apply_votes(*st, gv, ge, TUNED_RULE)))
            row["votes_ms"] = timed_update(gpu, lambda: gpu.set_votes(gi, gv, ge))
            row["float_ms"] = timed_update(gpu, lambda: gpu.set_evidence(gi, gg))
            for k in ("votes", "float", "triton", "torch_rewrite_only"):
                rate = u * ROW_BYTES / (row[f"{k}_ms"] / 1e3)
                row[f"{k}_GB_per_s"] = rate / 1e9
                row[f"{k}_pct_of_copy_bw"] = 100 * rate / bw
            out["results"].append(row)
            print(row, flush=True)
            # Put the CPU copy back in step for the next size (the timing loop moved the GPU one).
            gpu = copy.deepcopy(cpu).cuda()
        del cpu, gpu
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
