"""KG edge table: packed int32 slots (arbd/model/kg_edges.py) against the two-array layout it
replaced (int32 ids + int16 counts), side by side in one process (issue 10).

    python3 bench/kg_edges.py --baseline bench/.kg_edges_two_arrays.py [--nodes 10000000] [--cap 32]

The baseline is the previous kg_edges.py (`git show 82e8ea8:arbd/model/kg_edges.py`). Both
tables get the same pairs: a warm-up that fills rows, then timed steps of `--pairs` pairs (sources
and neighbours drawn from a Zipf-like law over the nodes, as motif ids are). Reported: table
bytes, observe and neighbors time per call (wall time to a synchronisation, median), and whether
both tables hold the same edges and counts (they must while no count passes 255, the new
layout's aging point; rows that never passed it are compared on their own).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arbd.model.kg_edges import KGEdges  # noqa: E402


def _load(path: str):
    spec = importlib.util.spec_from_file_location("kg_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.KGEdges


def _ids(n: int, nodes: int, g: torch.Generator, device) -> torch.Tensor:
    # Zipf-like: a few motifs are very frequent, most are rare.
    u = torch.rand(n, generator=g, device=device, dtype=torch.float64)
    return ((nodes ** u) - 1).long().clamp_max(nodes - 1)


def _timed(fn, reps: int, device: torch.device) -> float:
    """Median ms per call; every call ends with a synchronisation (observe reads back anyway)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="path of the two-array kg_edges.py")
    ap.add_argument("--nodes", type=int, default=10_000_000)
    ap.add_argument("--cap", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=16_384)
    ap.add_argument("--warm-steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    tables = {"packed slots": KGEdges(args.nodes, args.cap, device=dev),
              "two arrays (baseline)": _load(args.baseline)(args.nodes, args.cap, device=dev)}
    g = torch.Generator(device=dev).manual_seed(0)
    steps = [(_ids(args.pairs, args.nodes, g, dev), _ids(args.pairs, args.nodes, g, dev))
             for _ in range(args.warm_steps + args.reps)]
    probe = torch.unique(_ids(8192, args.nodes, g, dev))
    out = {"nodes": args.nodes, "cap": args.cap, "pairs": args.pairs, "rows": {}}
    for name, t in tables.items():
        for s, d in steps[:args.warm_steps]:
            t.observe(s, d)
        it = iter(steps[args.warm_steps:])
        obs = _timed(lambda: t.observe(*next(it)), args.reps, dev)
        nb = _timed(lambda: t.neighbors(probe), args.reps, dev)
        nbytes = sum(b.numel() * b.element_size() for b in t.buffers())
        out["rows"][name] = {"bytes": nbytes, "observe_ms": obs, "neighbors_ms": nb}
    new, old = tables["packed slots"], tables["two arrays (baseline)"]
    ids, counts = new.table()
    out["same_edges"] = bool(torch.equal(ids, old.dst.long()) and torch.equal(counts, old.weight.long()))
    out["max_count"] = int(old.weight.max())
    # Rows whose baseline counts stayed within 8 bits were never aged: they must agree.
    young = old.weight.max(1).values <= 255
    same = (ids == old.dst.long()).all(1) & (counts == old.weight.long()).all(1)
    out["young_rows"], out["young_rows_equal"] = int(young.sum()), int((same & young).sum())
    out["occupied_slots"] = int((ids >= 0).sum())
    out["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(json.dumps(out, indent=1))
    print(f"| layout | table GB | observe ms ({args.pairs} pairs) | neighbors ms ({probe.numel()} nodes) |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in out["rows"].items():
        print(f"| {name} | {r['bytes'] / 1e9:.3f} | {r['observe_ms']:.3f} | {r['neighbors_ms']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"rows never aged: {out['young_rows_equal']} of {out['young_rows']} equal to the baseline")
    return 0 if out["same_edges"] or out["max_count"] > 255 else 1


if __name__ == "__main__":
    sys.exit(main())
