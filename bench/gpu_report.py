"""Markdown tables from the JSON files of bench/run_gpu.sh; optionally appended to RESULTS.md.

    python bench/gpu_report.py DIR [--append bench/RESULTS.md] [--command "..."]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os


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
                "| table rows | touched | votes: GPU == CPU | Triton == CPU | torch apply_update ms | torch rewrite only ms | Triton ms | Triton GB/s | % of copy BW | float evidence: rows differing from CPU |",
                "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in up["results"]:
            out.append(f"| {r['rows']:,} | {r['touched']:,} | {r['votes_equal_cpu']} | "
                       f"{r['triton_equal_cpu']} | {r['votes_ms']:.3f} | "
                       f"{r['torch_rewrite_only_ms']:.3f} | {r['triton_ms']:.4f} | "
                       f"{r['triton_GB_per_s']:.0f} | {r['triton_pct_of_copy_bw']:.0f}% | "
                       f"{r['float_rows_differing']} |")
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
        out += ["", f"Correctness of the GEMM kernels vs float64: {'all pass' if ok else 'FAILURES'}.", ""]
    return out


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
