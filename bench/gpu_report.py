"""Markdown tables from the JSON files of bench/run_gpu.sh; optionally appended to RESULTS.md.

    python bench/gpu_report.py DIR [--append bench/RESULTS.md] [--command "..."]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # bench.* imports


def _load(d: str, name: str) -> dict | None:
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None


def tables(d: str) -> list[str]:
    out: list[str] = []
    lk = _load(d, "gpu_vq_lookup.json")
    if lk:
        out += [f"**Candidate lookup**, {lk['rows']:,} x 64, {lk['queries']:,} queries a batch "
                f"(checks: {lk['checks']}). Graphed `codebook.lookup`, do_bench median with L2 "
                "flushed; b2b = back-to-back replays, no flush.", "",
                "| candidate_count | torch ms | Triton ms | speedup | torch b2b ms | Triton b2b ms | same ids |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in lk["times"]:
            out.append(f"| {r['C']} | {r['torch_graph_ms']:.3f} | {r['triton_graph_ms']:.3f} | "
                       f"{r['speedup']:.1f}x | {r.get('torch_graph_b2b_ms', float('nan')):.3f} | "
                       f"{r.get('triton_graph_b2b_ms', float('nan')):.3f} | {r['same_ids']} |")
        k64 = next((r for r in lk["times"] if r["C"] == 64), None)
        if k64:
            out += ["", "At 64: kernel alone (quantize in kernel) by num_warps: " + ", ".join(
                f"{w} warps {k64[f'kernel_w{w}_ms']:.3f} ms" for w in (1, 2, 4, 8)
                if f"kernel_w{w}_ms" in k64) + f"; ids only {k64['ids_only_ms']:.3f} ms; torch "
                f"quantize_queries {k64['quantize_ms']:.3f} ms."]
        out.append("")
    ga = _load(d, "gpu_gather.json")
    if ga:
        out += ["**Packed-row gather**, random rows of a 10M-row table "
                f"(checks: {all(ga['checks'].values())}).", "",
                "| row bytes | rows gathered | torch index_select ms | Triton ms | Triton G rows/s | torch G rows/s | speedup |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in ga["times"]:
            out.append(f"| {r['W']} | {r['n']:,} | {r['torch_index_select_ms']:.3f} | "
                       f"{r['triton_best_ms']:.3f} | {r['triton_G_rows_per_s']:.1f} | "
                       f"{r['torch_G_rows_per_s']:.1f} | {r['speedup_vs_index_select']:.1f}x |")
        out.append("")
    up = _load(d, "gpu_update.json")
    if up:
        out += [f"**Touched-row update** (TUNED_RULE, integer votes; {up['row_bytes']} B moved per "
                f"row; device copy {up['copy_TB_per_s']:.2f} TB/s measured in the run).", "",
                "Kernel: what `apply_votes_rows` picks for the layout (arrays: the Triton kernel "
                "above 2^18 rows, the CUDA rows kernel below; record: the CUDA record kernel).", "",
                "Kernel ms: from an idle device (host launch work included); device ms: the "
                "device's time alone (a spin queued ahead hides the host's work), which the "
                "bandwidth goal reads.", "",
                "apply_update ms: `TernaryMatrix.apply_update` after `set_votes`, its ids merged "
                "again or (distinct) handed over as the data-parallel reduction does.", "",
                "| table rows | layout | touched | votes: GPU == CPU | kernel == CPU | apply_update ms | apply_update ms, distinct | torch rewrite only ms | kernel ms | % of copy BW | kernel device ms | device GB/s | device % of copy BW | float evidence: rows differing from CPU |",
                "| ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in up["results"]:
            out.append(f"| {r['rows']:,} | {r.get('layout', 'arrays')} | {r['touched']:,} | {r['votes_equal_cpu']} | "
                       f"{r['triton_equal_cpu']} | {r['votes_ms']:.3f} | "
                       f"{r.get('votes_distinct_ms', float('nan')):.3f} | "
                       f"{r['torch_rewrite_only_ms']:.3f} | {r['triton_ms']:.4f} | "
                       f"{r['triton_pct_of_copy_bw']:.0f}% | {r['kernel_device_ms']:.4f} | "
                       f"{r['kernel_device_GB_per_s']:.0f} | "
                       f"{r['kernel_device_pct_of_copy_bw']:.0f}% | {r['float_rows_differing']} |")
        out.append("")
    tc = _load(d, "gpu_ternary_check.json")
    if tc:
        out += ["**Packed ternary GEMM** (K = N = 7168, bf16; default configs).", "",
                "| op | M | ours ms | cuBLAS ms | speedup |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in tc["timings"]:
            if not r.get("reference_row") and r.get("ms") is not None:
                out.append(f"| {r['op']} | {r['M']} | {r['ms']:.4f} | {r['cublas_ms']:.4f} | "
                           f"{r['speedup_vs_cublas']:.2f}x |")
        ok = all(r["ok"] for r in tc["correctness"])
        out += ["", f"Correctness of the GEMM kernels vs float64: {'all pass' if ok else 'FAILURES'}. "
                "Timed eagerly (do_bench): at M = 16 this measures launches; the next table times "
                "M <= 16 in CUDA graphs.", ""]
    du = _load(d, "gpu_dense_update.json")
    if du:
        from bench.gpu_dense_update import report_lines   # torch and arbd only when needed
        out += ["**Fused dense update** (`bench/gpu_dense_update.py`; TUNED_RULE, fp32 evidence; "
                f"device copy {du['copy_GBps']:.0f} GB/s).", "", *report_lines(du), ""]
    sm = _load(d, "gpu_gemm_small_m.json")
    if sm:
        rows = sm["rows"]
        checks = [r for r in rows if r["kind"] in ("check", "graph-check")]
        bad = sum(not r["ok"] for r in checks) + sum(r["kind"] == "error" for r in rows)
        out += ["**Small-M forward** (K = N = 7168, bf16), CUDA graphs of 32 calls over 8 weight "
                "copies (82 MB, from DRAM), interleaved with cuBLAS; median over rounds. `default`: "
                "what `ternary_matmul` runs; `CUDA tiled`: the tile-major kernel "
                f"(`ARBD_CUDA_SMALL_M=tiled`). Checks: {len(checks)} run, {bad} failed.", "",
                "| M | path | median ms | min ms | max ms | cuBLAS / ours |",
                "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if r["kind"] == "time":
                out.append(f"| {r['M']} | {r['config']} | {r['ms']:.4f} | {r['min_ms']:.4f} | "
                           f"{r['max_ms']:.4f} | {r['speedup_vs_cublas']:.2f}x |")
        conv = next((r for r in rows if r["kind"] == "conversion"), None)
        if conv:
            out.append(f"\nMaking the tile-major copy of one 7168 x 7168 weight: {conv['ms']:.2f} ms.")
        out.append("")
    lm = _load(d, "gpu_gemm_large_m.json")
    if lm:
        checks = [r for r in lm["rows"] if r["kind"] == "check"]
        out += ["**Large-M forward** (M = 8192, K = N = 7168, bf16; `bench/gpu_gemm_large_m.py`): the fused "
                "kernel (`ARBD_CUDA_LARGE_M=on`) against cuBLAS and the default path, interleaved; median "
                f"over rounds. Checks: {len(checks)} run, {sum(not r['ok'] for r in checks)} failed.", "",
                "| path | median ms | min ms | max ms | cuBLAS / this |", "| --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {r['what']} | {r['ms']:.4f} | {r['spread_ms'][0]:.4f} | {r['spread_ms'][1]:.4f} | "
                f"{r['vs_cublas']:.3f}x |" for r in lm["rows"] if r["kind"] == "time"]
        out.append("")
    steps = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
             if f.startswith("step_") and f.endswith(".json")]
    if steps:
        out += ["**Training step** (`bench/train_step_gpu.py`; ternary: the plan's settings; dense "
                "twin: DeepSpeed + fused Adam, ZeRO-1, bf16).", "",
                "| run | micro x accum x seq | tokens/s | median step s | peak GiB |",
                "| --- | --- | ---: | ---: | ---: |"]
        for r in steps:
            what = f"{r.get('preset')} {r.get('model')}" + (
                f", cap {r['mem_cap_gib']:g} GiB" if r.get("mem_cap_gib") else "")
            if not r.get("ok", False):
                out.append(f"| {what} | {r.get('micro_batch')} x {r.get('grad_accum')} x "
                           f"{r.get('seq_len')} | failed: {str(r.get('error'))[:160]} | | "
                           f"{r.get('peak_train_bytes', 0) / 2**30:.2f} |")
                continue
            out.append(f"| {what} | {r['micro_batch']} x {r['grad_accum']} x {r['seq_len']} | "
                       f"{r['tokens_per_s']:,.0f} | {statistics.median(r['step_s']):.3f} | "
                       f"{r['peak_train_bytes'] / 2**30:.2f} |")
        out.append("")
    parts = os.path.join(d, "parts.txt")
    if os.path.exists(parts):
        out += ["Parts of `bench/run_gpu.sh` (exit code, wall time): "
                + "; ".join(line.strip() for line in open(parts) if line.strip()) + ".", ""]
    score = targets(d)
    if score:
        out += ["**Targets** (issue 10; measured in this run):", "",
                "| target | goal | measured | met |", "| --- | --- | --- | --- |"]
        out += [f"| {t} | {g} | {m} | {'yes' if ok else '**no**'} |" for t, g, m, ok in score]
        out.append("")
    return out


def targets(d: str) -> list[tuple[str, str, str, bool]]:
    """(target, goal, measured, met) for each of issue 10's targets whose JSON is in d."""
    rows: list[tuple[str, str, str, bool]] = []
    sm = _load(d, "gpu_gemm_small_m.json")
    if sm:
        at16 = [r for r in sm["rows"] if r["kind"] == "time" and r["M"] == 16
                and not r["config"].startswith("cuBLAS")]
        if at16:
            best = max(at16, key=lambda r: r["speedup_vs_cublas"])
            rows.append(("forward M = 16, K = N = 7168, vs cuBLAS bf16 (CUDA graphs)", ">= 4x",
                         f"{best['speedup_vs_cublas']:.2f}x ({best['config']}, {best['ms'] * 1e3:.1f} us)",
                         best["speedup_vs_cublas"] >= 4.0))
    lm = _load(d, "gpu_gemm_large_m.json")
    if lm:
        per_call = next((r for r in lm["rows"] if r["kind"] == "time" and r["what"].startswith("fused, fragment")),
                        None)
        ok = all(r["ok"] for r in lm["rows"] if r["kind"] == "check")
        if per_call:
            rows.append(("forward M = 8192, fused kernel with its copy per call (ARBD_CUDA_LARGE_M=on)",
                         ">= 1.0x", f"{per_call['vs_cublas']:.3f}x (checks {ok})",
                         ok and per_call["vs_cublas"] >= 1.0))
    tc = _load(d, "gpu_ternary_check.json")
    if tc:
        goals = {"forward": 1.0, "grad_input": 0.8, "weight_grad": 0.8}
        for r in tc["timings"]:
            if r.get("reference_row") or r.get("M") != 8192 or r.get("op") not in goals:
                continue
            sp = r.get("speedup_vs_cublas")
            rows.append((f"{r['op']} M = 8192 vs cuBLAS bf16", f">= {goals[r['op']]}x",
                         "error" if sp is None else f"{sp:.2f}x",
                         sp is not None and sp >= goals[r["op"]]))
    lk = _load(d, "gpu_vq_lookup.json")
    if lk:
        r = next((r for r in lk["times"] if r["C"] == 64), None)
        if r:
            ok = r["triton_graph_ms"] <= 0.5 and all(lk["checks"].values())
            rows.append(("candidate lookup 10M x 64, 16,384 queries, candidate_count 64", "<= 0.5 ms",
                         f"{r['triton_graph_ms']:.3f} ms (checks {all(lk['checks'].values())})", ok))
    ga = _load(d, "gpu_gather.json")
    if ga:
        rates = [r["triton_G_rows_per_s"] for r in ga["times"] if r["W"] == 16]
        if rates:
            rows.append(("packed-row gather, 16-byte rows", ">= 20 G rows/s",
                         f"{min(rates):.1f}-{max(rates):.1f} G rows/s",
                         min(rates) >= 20 and all(ga["checks"].values())))
    up = _load(d, "gpu_update.json")
    if up:
        for r in up["results"]:
            if r["touched"] < 1_000_000:
                continue
            ok = r["votes_equal_cpu"] and r["triton_equal_cpu"]
            rows.append((f"touched-row update {r['rows'] / 1e6:g}M rows, {r['touched']:,} touched, "
                         f"{r.get('layout', 'arrays')} layout",
                         "== CPU, >= 50% of copy BW (device time)",
                         f"{r['kernel_device_pct_of_copy_bw']:.1f}% ({r['triton_pct_of_copy_bw']:.1f}% "
                         f"from idle), equal to CPU: {ok}",
                         ok and r["kernel_device_pct_of_copy_bw"] >= 50))
    t = _load(d, "step_small_ternary.json")
    n = _load(d, "step_small_dense.json")
    if t and n:
        if t.get("ok") and n.get("ok"):
            sp = t["tokens_per_s"] / n["tokens_per_s"]
            mem = t["peak_train_bytes"] / n["peak_train_bytes"]
            rows.append((f"arb-small step vs dense twin at {t['micro_batch']} x {t['seq_len']}",
                         ">= 1.0x tokens/s at <= 1/6 peak", f"{sp:.2f}x at {mem:.3f}",
                         sp >= 1.0 and mem <= 1 / 6))
        else:
            rows.append(("arb-small step vs dense twin", ">= 1.0x tokens/s at <= 1/6 peak",
                         "a run failed", False))
    b = _load(d, "step_3b_cap24.json")
    if b:
        peak = b.get("peak_train_bytes", 0) / 2**30
        rows.append((f"arb-3b trains under a 24 GiB cap, {b.get('micro_batch')} x {b.get('seq_len')}",
                     "fits, context 2048", f"peak {peak:.2f} GiB, ok {b.get('ok')}",
                     bool(b.get("ok")) and peak <= 24 and b.get("seq_len", 0) >= 2048))
        if "state" in b:
            bpw = b["state"]["total_B_per_weight"]
            rows.append(("arb-3b persistent training state", "<= 1.5 B/weight", f"{bpw:.3f} B/weight",
                         bpw <= 1.5))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--append", default=None)
    p.add_argument("--command", default="bash bench/run_gpu.sh")
    p.add_argument("--machine", default="")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    args = p.parse_args()
    body = tables(args.dir)
    head = [f"## GPU suite (bench/run_gpu.sh), {args.date}", "",
            f"Command: `{args.command}`; machine: {args.machine}.", ""]
    text = "\n".join(head + body)
    print(text)
    with open(os.path.join(args.dir, "gpu_tables.md"), "w") as f:
        f.write(text + "\n")
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
