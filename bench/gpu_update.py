"""Touched-row codebook updates on the GPU: correctness against the CPU and bandwidth.

    python bench/gpu_update.py --json runs/gpu_update.json
    python bench/gpu_update.py --sweep [--baseline OLD.py] --json runs/gpu_update_sweep.json

The sweep (below, `sweep`) times only the kernels (the CUDA one of csrc/rows.cu and the Triton
one, with their launch variants) and optionally an earlier version of triton_update.py
(--baseline) on random states of the real table sizes.

The real tables: the SharedVQ codebook (10,000,000 x 64) and the KG VQ (5,000,000 x 64), built
on the CPU and copied to the GPU. For U touched rows (distinct random ids) the same evidence is
given to both copies and `TernaryMatrix.apply_update(TUNED_RULE)` runs on each:
- integer votes (`set_votes`, what data-parallel training hands over): exact integer arithmetic,
  so the whole GPU state must equal the CPU state byte for byte;
- float evidence (`set_evidence`): the rule's row norms are float sums whose order may differ
  between devices, so the count of rows that differ is reported.
Time: median of CUDA-event timings of apply_update alone (evidence set before each), from an
idle device, so the host's launch work is included; the kernel is also timed as device time
alone (`kernel_device_ms`: event_median_ms(queued=True)), which is what the bandwidth goal
measures: in a training step the host runs ahead and its launch work overlaps the device's. Bytes it
must move per touched row: evidence read (votes int32 or float32: 4 B x 64 + 4), the row id (8),
and a read and a write of packed trits (13), exponent (1), trit accumulators (64), scale
accumulator (1). Bandwidth is compared with a device-to-device copy measured in the same run.
`--layouts arrays,record` runs each table in both state layouts (four arrays, the default; or
one 80-byte record per row, `state_layout="record"`), `--touched-record` the record layout's sizes.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from arbd.ternary import cuda_rows, packing  # noqa: E402
from arbd.ternary.rule import TUNED_RULE, apply_votes  # noqa: E402
from arbd.ternary.state import record_width, row_records  # noqa: E402
from arbd.ternary.triton_update import apply_votes_rows  # noqa: E402
from arbd.vq.codebook import TernaryVQCodebook  # noqa: E402

ROW_BYTES = 4 * 64 + 4 + 8 + 2 * (13 + 1 + 64 + 1)


# Cycles of device spin queued ahead of a timed call when timing device time only (queued=True):
# about 2 ms, far longer than any host work before the call's first launch, so the start event
# fires only once the call's kernels are queued behind it. That hides the host's launch overhead,
# as it is hidden in a training step where the host runs ahead of the device; a call that waits
# for the device inside is still timed whole.
QUEUE_CYCLES = 4_000_000


def event_median_ms(fn, reps: int = 15, before=None, warmup: int = 2,
                    queued: bool = False) -> float:
    """Median CUDA-event time of fn in ms over reps calls, after warmup untimed ones; `before`
    (untimed, e.g. resetting evidence) runs ahead of each call. queued=False: from an idle device,
    the host's launch overhead included; True: the device's time alone (QUEUE_CYCLES)."""
    ts = []
    for _ in range(reps + warmup):
        if before is not None:
            before()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(QUEUE_CYCLES)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts[warmup:])[reps // 2]


def host_median_us(fn, reps: int = 15) -> float:
    """Median host time of one call of fn in us (the device idle and synchronised before each)."""
    ts = []
    for _ in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return sorted(ts[2:])[reps // 2]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 20)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (event_median_ms(lambda: b.copy_(a), reps=20, warmup=3) / 1e3)


def timed_update(m, set_evidence, reps: int = 15) -> float:
    return event_median_ms(lambda: m.apply_update(TUNED_RULE), reps, before=set_evidence)


def timed(fn, reps: int = 15) -> float:
    """Median CUDA-event time of fn alone, in ms."""
    return event_median_ms(fn, reps)


def same_state(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in
               ((a.packed, b.packed), (a.exponent, b.exponent), (a.t_accum, b.t_accum),
                (a.e_accum, b.e_accum)))


# -- sweep: the kernel alone ------------------------------------------------------------------
def _no_scale_votes(packed, t_accum, exponent, e_accum, idx, votes, e_votes, rule, **kw):
    return cuda_rows.apply_votes_rows(packed, t_accum, exponent, e_accum, idx, votes, None, rule, **kw)


# (function, keyword arguments) of each variant; "default" is what TernaryMatrix calls (the CUDA
# kernel for updates of up to cuda_rows.AUTO_MAX_ROWS rows of up to 64 trits, else Triton). cuda_rR_bB: R groups of four rows in
# flight per warp, B blocks of 256 threads per SM (1000: a warp per 4R rows, no loop).
VARIANTS = {
    "default": (apply_votes_rows, {}),
    "triton_gather_b16_w4": (apply_votes_rows, dict(packing_mode="gather")),
    "triton_gather_b32_w4": (apply_votes_rows, dict(packing_mode="gather", block_r=32)),
    "triton_scan_b32_w8_loop_p4": (apply_votes_rows, dict(packing_mode="scan")),
    **{f"cuda_r{r}_b{b}": (cuda_rows.apply_votes_rows, dict(rows_in_flight=r, blocks_per_sm=b))
       for r, b in ((1, 3), (1, 8), (1, 1000), (2, 2), (2, 8), (2, 1000), (4, 1), (4, 1000))},
    # The floor of this access pattern: the CUDA kernel's loads and stores without the rule
    # (equal_torch is False by design); then without the two 1-byte per-row fields (exponent,
    # scale accumulator), each a sector read and written per row; and the real kernel without
    # them (no scale votes).
    "floor_cuda_r1_b3": (cuda_rows.apply_votes_rows,
                         dict(rows_in_flight=1, blocks_per_sm=3, _memory_only=True)),
    "floor_without_row_bytes": (_no_scale_votes, dict(rows_in_flight=1, blocks_per_sm=3,
                                                      _memory_only=True)),
    "cuda_r1_b3_without_row_bytes": (_no_scale_votes, dict(rows_in_flight=1, blocks_per_sm=3)),
    # The record kernel (a warp per 32 rows staged in shared memory; only with --layouts record),
    # B blocks of two warps per SM, and its floor (its loads and stores without the rule).
    **{f"record_b{b}": (cuda_rows.apply_votes_rows, dict(kernel="record", blocks_per_sm=b))
       for b in (1, 2, 3, 4, 5)},
    "floor_record_b3": (cuda_rows.apply_votes_rows,
                        dict(kernel="record", blocks_per_sm=3, _memory_only=True)),
}


def _timer(device: str):
    """Median-of-reps timer: CUDA events on the GPU, the host clock otherwise (interpreter)."""
    def run(fn, reps: int = 20, warm: int = 3) -> float:
        if device == "cuda":
            return event_median_ms(fn, reps, warmup=warm)
        ts = []
        for i in range(reps + warm):
            t0 = time.perf_counter()
            fn()
            if i >= warm:
                ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]
    return run


def _random_state(rows: int, cols: int, g: torch.Generator, device: str,
                  layout: str = "arrays") -> list[torch.Tensor]:
    """packed uint8, t_accum int8, exponent int8, e_accum int8: random, valid, never all zero;
    four arrays, or (layout "record") the views of one row record each (state.row_records)."""
    nb = packing.packed_cols(cols)
    state = [torch.randint(0, 243, (rows, nb), generator=g, device=device, dtype=torch.uint8),
             torch.randint(-127, 128, (rows, cols), generator=g, device=device, dtype=torch.int8),
             torch.randint(-128, 128, (rows,), generator=g, device=device, dtype=torch.int8),
             torch.randint(-127, 128, (rows,), generator=g, device=device, dtype=torch.int8)]
    return _in_layout(state, layout)


def _in_layout(state: list[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """A copy of the four buffers: four arrays, or the views of new row records."""
    if layout == "arrays":
        return [t.clone() for t in state]
    rows, cols = state[1].shape
    views = list(row_records(rows, cols, state[0].device)[1:])
    for v, t in zip(views, state):
        v.copy_(t)
    return views


def _torch_rule_rows(state: list[torch.Tensor], idx, votes, e_votes, rule, cols: int):
    """The torch rule on rows idx (what TernaryMatrix._rewrite_rows does): the new state and
    the counts."""
    packed, t_acc, exp, e_acc = state
    tr, ta, ex, ea, st = apply_votes(packing.unpack_trits(packed[idx], cols), t_acc[idx],
                                     exp[idx], e_acc[idx], votes, e_votes, rule)
    out = [t.clone() for t in state]
    out[0][idx], out[1][idx], out[2][idx], out[3][idx] = packing.pack_trits(tr), ta, ex, ea
    return out, [int(st["trit_flips"]), int(st["scale_moves"])]


def _sector_bytes(idx: torch.Tensor, nb: int, cols: int, layout: str = "arrays") -> int:
    """Bytes in whole 32-byte sectors the update must move: votes, scale votes and ids stream in
    once; every distinct sector of packed / t_accum / exponent / e_accum (or of the row record)
    that a touched row lies in is read once and written once (DRAM moves sectors, not bytes)."""
    def sectors(start, length):
        first, last = start // 32, (start + length - 1) // 32
        s = torch.cat([first, last]) if length > 1 else first
        return int(torch.unique(s).numel()) if length <= 32 else -1

    u = idx.numel()
    i = idx.long()
    if layout == "record":
        w = record_width(cols)
        first, last = i * w // 32, (i * w + w - 1) // 32
        return u * (4 * cols + 4 + 8) + 2 * 32 * int((last - first + 1).sum())
    packed_s = sectors(i * nb, nb)
    exp_s = sectors(i, 1)
    t_acc = 2 * u * ((cols + 31) // 32) * 32   # 64-byte rows: whole sectors
    return u * (4 * cols + 4 + 8) + t_acc + 2 * 32 * (packed_s + 2 * exp_s)


def sweep(args) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    timed_ms = _timer(dev)
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_update", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    bw = copy_bandwidth() if dev == "cuda" else float("nan")
    out: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "copy_TB_per_s": bw / 1e12, "row_bytes": ROW_BYTES, "results": []}
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s", flush=True)
    variants = {k: v for k, v in VARIANTS.items()
                if args.variants is None or k in args.variants.split(",")}
    if base is not None:
        variants["old_b16"] = (base.apply_votes_rows, dict(block_r=16))
        variants["old_b32"] = (base.apply_votes_rows, dict(block_r=32))
    cols, rule = 64, TUNED_RULE
    cases = [(c, lay) for c in args.cases.split(",") for lay in args.layouts.split(",")]
    for case, layout in cases:
        rows, u, order = case.split(":")
        rows, u = int(rows), int(u)
        g = torch.Generator(device=dev).manual_seed(rows + u)
        state0 = _random_state(rows, cols, g, dev, layout)
        idx = torch.randperm(rows, generator=g, device=dev)[:u]
        if order == "sorted":                # what TernaryMatrix.votes() hands over
            idx = idx.sort().values
        votes = torch.randint(-40, 41, (u, cols), generator=g, device=dev, dtype=torch.int32)
        e_votes = torch.randint(-20, 21, (u,), generator=g, device=dev, dtype=torch.int32)
        want, want_stats = _torch_rule_rows(state0, idx, votes, e_votes, rule, cols)
        head = {"rows": rows, "touched": u, "order": order, "layout": layout,
                "torch_stats": want_stats,
                "sector_bytes": _sector_bytes(idx, state0[0].shape[1], cols, layout)}
        if not args.no_cpu_check:
            # the CPU torch rule on the touched rows' state, against the GPU torch rule
            t0 = time.perf_counter()
            cpu_rows = [t[idx].cpu() for t in state0]
            ci = torch.arange(u)
            cpu_new, cpu_stats = _torch_rule_rows(cpu_rows, ci, votes.cpu(), e_votes.cpu(), rule,
                                                  cols)
            head["gpu_torch_equals_cpu"] = (cpu_stats == want_stats and all(
                torch.equal(a, w[idx].cpu()) for a, w in zip(cpu_new, want)))
            head["cpu_check_s"] = round(time.perf_counter() - t0, 1)
        print(head, flush=True)
        work = _in_layout(state0, layout)
        for name, (fn, kw) in variants.items():
            for w, s0 in zip(work, state0):
                w.copy_(s0)
            try:
                stats = fn(*work, idx, votes, e_votes, rule, **kw)
            except ValueError as err:   # a kernel for the other layout
                print(f"{name} skipped on {layout}: {err}", flush=True)
                continue
            equal = stats.tolist() == want_stats and all(
                torch.equal(a, b) for a, b in zip(work, want))
            call = lambda: fn(*work, idx, votes, e_votes, rule, **kw)  # noqa: E731
            ms = timed_ms(call)
            rate = u * ROW_BYTES / (ms / 1e3)
            row = {**{k: head[k] for k in ("rows", "touched", "order", "layout")}, "variant": name,
                   "equal_torch": equal, "ms": ms, "GB_per_s": rate / 1e9,
                   "pct_of_copy_bw": 100 * rate / bw,
                   "sector_pct_of_copy_bw": 100 * head["sector_bytes"] / (ms / 1e3) / bw}
            if dev == "cuda":
                # the device's time alone (the host's launch work hidden behind a queued spin),
                # and the host's time of one call
                dms = event_median_ms(call, 20, warmup=3, queued=True)
                row.update(device_ms=dms, device_pct_of_copy_bw=100 * u * ROW_BYTES / (dms / 1e3) / bw,
                           host_us=host_median_us(call))
            out["results"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
        out.setdefault("cases", []).append(head)
        del state0, want, work
    try:   # registers per compiled variant (Triton's per-device cache of the kernel)
        from arbd.ternary.triton_update import _apply_votes_kernel
        for kern in _apply_votes_kernel.device_caches[0][0].values():
            print("compiled:", kern.metadata.num_warps, "warps,", kern.n_regs, "regs,",
                  kern.n_spills, "spills", flush=True)
    except Exception as e:  # noqa: BLE001 - a report only
        print("no register report:", e)
    print("\n| rows | touched | order | layout | variant | equal | ms | GB/s | % copy | % copy (sectors) "
          "| device ms | device % copy | host us |")
    for r in out["results"]:
        print(f"| {r['rows']:,} | {r['touched']:,} | {r['order']} | {r['layout']} | {r['variant']} | "
              f"{r['equal_torch']} | {r['ms']:.4f} | {r['GB_per_s']:.0f} | "
              f"{r['pct_of_copy_bw']:.1f} | {r['sector_pct_of_copy_bw']:.1f} | "
              f"{r.get('device_ms', float('nan')):.4f} | "
              f"{r.get('device_pct_of_copy_bw', float('nan')):.1f} | "
              f"{r.get('host_us', float('nan')):.0f} |")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--tables", default="10000000,5000000")
    p.add_argument("--touched", default="16384,262144,1048576")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true", help="time the kernel and its variants only")
    p.add_argument("--cases", default="10000000:1048576:random,10000000:1048576:sorted,"
                   "5000000:4194304:random,5000000:4194304:sorted,5000000:1048576:random,"
                   "10000000:262144:random,10000000:16384:random",
                   help="sweep: rows:touched:random|sorted, ...")
    p.add_argument("--variants", default=None, help="sweep: comma-separated VARIANTS keys")
    p.add_argument("--layouts", default="arrays", help="state layouts, arrays and/or record "
                   "(one row record per row, arbd.ternary.state.row_records)")
    p.add_argument("--touched-record", default=None,
                   help="touched row counts for the record layout (default: --touched)")
    p.add_argument("--baseline", default=None, help="sweep: an earlier triton_update.py to time")
    p.add_argument("--no-cpu-check", action="store_true")
    args = p.parse_args(argv)
    if args.sweep:
        out = sweep(args)
        if args.json:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    bw = copy_bandwidth()
    out: dict = {"device": torch.cuda.get_device_name(), "copy_TB_per_s": bw / 1e12,
                 "row_bytes": ROW_BYTES, "results": []}
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s", flush=True)
    for rows, layout in [(int(v), lay) for v in args.tables.split(",")
                         for lay in args.layouts.split(",")]:
        cpu = TernaryVQCodebook(rows, 64, exact_max=0, check_finite=False,
                                state_layout=layout).matrix
        gpu = copy.deepcopy(cpu).cuda()
        touched = args.touched if layout == "arrays" else (args.touched_record or args.touched)
        for u in [int(v) for v in touched.split(",")]:
            g = torch.Generator().manual_seed(u + rows)
            idx = torch.randperm(rows, generator=g)[:u]
            votes = torch.randint(-40, 41, (u, 64), generator=g, dtype=torch.int32)
            e_votes = torch.randint(-20, 21, (u,), generator=g, dtype=torch.int32)
            grad = torch.randn(u, 64, generator=g) * 1e-2
            row = {"rows": rows, "touched": u, "layout": layout}
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
            def kernel() -> None:
                apply_votes_rows(tri.packed, tri.t_accum, tri.exponent, tri.e_accum, gi, gv, ge,
                                 TUNED_RULE)
            row["triton_ms"] = timed(kernel)
            # the kernel's device time alone (the host's launch work hidden: event_median_ms)
            row["kernel_device_ms"] = event_median_ms(kernel, 15, queued=True)
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
            # as the data-parallel reduction hands them over: ids known distinct, no second merge
            row["votes_distinct_ms"] = timed_update(
                gpu, lambda: gpu.set_votes(gi, gv, ge, distinct=True))
            row["float_ms"] = timed_update(gpu, lambda: gpu.set_evidence(gi, gg))
            for k in ("votes", "float", "triton", "torch_rewrite_only", "kernel_device"):
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
