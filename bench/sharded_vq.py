"""Row-sharded codebook on gloo: bytes per query and time per lookup / training step, W = 1..4,
for both lookup strategies; plus a model of bytes per query at larger W.

    python bench/sharded_vq.py                        # W = 1..4, 200K rows, 512 queries a rank
    python bench/sharded_vq.py --model-only           # just the bytes model (no processes)

Measured: every rank looks up its own batch (queries = random rows of the table + Gaussian
noise, different per rank); times are the slowest rank's, median over --repeats; bytes are what
a rank hands to collectives for other ranks (its own segment is a local copy), averaged over
ranks. The training step is forward + backward + apply_update, for semantics 'concat' (float
evidence per query) and 'micro' with integer votes (commit_micro_batch, aggregated per row).

Model: the same byte accounting applied to candidate ids computed with the real hash and layout
of a table of --model-rows rows (no rows are materialised) for one rank's batch of
--model-queries random queries, rank 0's view: fetch = remote unique ids x (4 B request + 14 B
row) + meta; score = remote (query, owner) pairs x (256 B query + 22 B result) + meta; meta =
3 x (W - 1) x 64 B (lookup). Update: concat float = remote queries x (8 + 4 dim) + remote
touched rows x 8 (usage); micro votes = remote touched rows x (4 + dim + 1 + 8).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arbd.parallel.launch_utils import run_on_ranks  # noqa: E402
from arbd.parallel.sharded_vq import ShardedTernaryVQCodebook, shard_bounds  # noqa: E402
from arbd.ternary.rule import TUNED_RULE  # noqa: E402
from arbd.vq import lookup  # noqa: E402
from arbd.vq.hashing import CellLayout, SignHash, hash_bits_for  # noqa: E402

META_BYTES = 8 * 8     # one meta row: 8 int64 fields


def _queries(cb: ShardedTernaryVQCodebook, n: int, seed: int, noise: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, cb.num_codes, (n,), generator=g)
    # Rows are decoded from the same placed init as the table (collective fetch).
    x = cb.decode_rows(rows)
    return x + noise * x.std() * torch.randn(x.shape, generator=g)


def _slowest(t: float) -> float:
    v = torch.tensor([t], dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return float(v)


def _mean(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _worker(rank: int, world: int, a: dict) -> dict:
    torch.set_num_threads(a["threads"])
    out: dict = {"world": world}
    kw = dict(candidate_count=a["candidates"], exact_max=0, hash_seed=0xBE7C)
    cb = ShardedTernaryVQCodebook(a["rows"], a["dim"], **kw)
    x = _queries(cb, a["queries"], 1000 + rank, a["noise"])
    for strategy in ("fetch", "score"):
        cb.strategy = strategy
        cb.lookup(x)                                   # warm-up
        times, b0, q0 = [], cb.comm.lookup_bytes, cb.comm.lookup_queries
        for _ in range(a["repeats"]):
            dist.barrier()
            t = time.perf_counter()
            cb.lookup(x)
            times.append(_slowest(time.perf_counter() - t))
        bq = (cb.comm.lookup_bytes - b0) / (cb.comm.lookup_queries - q0)
        out[f"lookup_{strategy}_ms"] = 1e3 * statistics.median(times)
        out[f"lookup_{strategy}_bpq"] = _mean(bq)
        out[f"lookup_{strategy}_rows"] = _mean(cb.last_lookup["rows_fetched"] or
                                               cb.last_lookup["pairs"])
    # Overlap: start the fetch, compute, then finish (vs the same sequentially).
    cb.strategy = "fetch"
    w = torch.randn(a["dim"], 2048)
    for mode in ("serial", "overlap"):
        times = []
        for _ in range(a["repeats"]):
            dist.barrier()
            t = time.perf_counter()
            if mode == "serial":
                cb.lookup(x)
                torch.tanh(x @ w).sum()
            else:
                h = cb.start_lookup(x)
                torch.tanh(x @ w).sum()
                cb.finish(h)
            times.append(_slowest(time.perf_counter() - t))
        out[f"{mode}_ms"] = 1e3 * statistics.median(times)
    # Training steps.
    for sem in ("concat", "micro"):
        for strategy in ("fetch", "score"):
            tr = ShardedTernaryVQCodebook(a["rows"], a["dim"], semantics=sem, strategy=strategy, **kw)
            times, ub, uq = [], 0, 0
            for step in range(a["repeats"] + 1):
                xs = x + 0.01 * step
                dist.barrier()
                t = time.perf_counter()
                o = tr(xs)
                o.loss.backward()
                if sem == "micro":
                    tr.commit_micro_batch(TUNED_RULE.scaled(1 / world))
                b = tr.comm.update_bytes
                tr.apply_update(TUNED_RULE)
                el = _slowest(time.perf_counter() - t)
                if step:                                   # step 0 is a warm-up
                    times.append(el)
                    ub += tr.comm.update_bytes - b
                    uq += a["queries"]
            out[f"step_{sem}_{strategy}_ms"] = 1e3 * statistics.median(times)
            out[f"update_{sem}_{strategy}_bpq"] = _mean(ub / uq)
    return out


def model(rows: int, dim: int, candidates: int, queries: int, worlds: list[int],
          seed: int = 0) -> list[dict]:
    """Bytes per query of rank 0, from the real candidate ids of random queries."""
    hasher = SignHash(dim, hash_bits_for(rows, 1, dim), 0xBE7C)
    layout = CellLayout(rows, hasher.bits)
    x = torch.randn(queries, dim, generator=torch.Generator().manual_seed(seed))
    xq, _ = lookup.quantize_queries(x)
    ids, valid = lookup.candidate_ids(xq, hasher, layout, candidates)
    # The chosen row is one of the candidates; which one barely matters for the owner
    # statistics, so take the first (the query's own cell).
    chosen = ids[:, 0].contiguous()
    nb = -(-dim // 5)
    out = []
    for w in worlds:
        b = torch.tensor(shard_bounds(rows, w))
        own = lambda t: torch.searchsorted(b[1:], t, right=True)  # noqa: E731
        uniq = torch.unique(ids)
        remote_uniq = int((own(uniq) != 0).sum())
        o = own(ids)
        present = torch.zeros(queries, w, dtype=torch.bool)
        present[torch.arange(queries)[:, None].expand_as(o)[valid], o[valid]] = True
        pairs = int(present.sum())
        remote_pairs = int(present[:, 1:].sum())
        meta = 3 * (w - 1) * META_BYTES
        touched = torch.unique(chosen)
        remote_touched = int((own(touched) != 0).sum())
        remote_q = int((own(chosen) != 0).sum())
        umeta = 3 * (w - 1) * META_BYTES
        out.append({
            "W": w, "rows": rows, "queries": queries,
            "owners_per_query": pairs / queries,
            "unique_ids_per_query": uniq.numel() / queries,
            "fetch_bpq": (remote_uniq * (4 + nb + 1) + meta) / queries,
            "score_bpq": (remote_pairs * (4 * dim + nb + 9) + meta) / queries,
            "update_concat_bpq": (remote_q * (8 + 4 * dim) + remote_touched * 8 + umeta) / queries,
            "update_votes_bpq": (remote_touched * (4 + dim + 1 + 8) + umeta) / queries,
        })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--queries", type=int, default=512, help="per rank")
    p.add_argument("--noise", type=float, default=0.35)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worlds", default="1,2,3,4")
    p.add_argument("--model-rows", type=int, default=10_000_000)
    p.add_argument("--model-queries", type=int, default=4096)
    p.add_argument("--model-worlds", default="2,3,4,8,64,512")
    p.add_argument("--model-only", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    args = vars(a)
    res: dict = {"args": args, "machine": f"{platform.node()} {os.cpu_count()} cpus, "
                 f"torch {torch.__version__}, gloo"}
    if not a.model_only:
        res["measured"] = [run_on_ranks(_worker, w, args)[0] for w in map(int, a.worlds.split(","))]
        print("| W | lookup fetch: B/query, ms | lookup score: B/query, ms | serial / overlapped ms "
              "| step concat fetch / score ms, update B/query | step micro-votes fetch ms, update B/query |")
        print("|---|---|---|---|---|---|")
        for m in res["measured"]:
            print(f"| {m['world']} | {m['lookup_fetch_bpq']:.0f}, {m['lookup_fetch_ms']:.1f} | "
                  f"{m['lookup_score_bpq']:.0f}, {m['lookup_score_ms']:.1f} | "
                  f"{m['serial_ms']:.1f} / {m['overlap_ms']:.1f} | "
                  f"{m['step_concat_fetch_ms']:.1f} / {m['step_concat_score_ms']:.1f}, "
                  f"{m['update_concat_fetch_bpq']:.0f} | {m['step_micro_fetch_ms']:.1f}, "
                  f"{m['update_micro_fetch_bpq']:.0f} |")
        res["model_bench_table"] = model(a.rows, a.dim, a.candidates, a.queries,
                                         [int(w) for w in a.worlds.split(",")])
        print("\nmodel at the bench's table (same accounting, random queries):")
        for m in res["model_bench_table"]:
            print(f"  W={m['W']}: fetch {m['fetch_bpq']:.0f} B/q, score {m['score_bpq']:.0f} B/q, "
                  f"owners/query {m['owners_per_query']:.2f}")
    res["model"] = model(a.model_rows, a.dim, a.candidates, a.model_queries,
                         [int(w) for w in a.model_worlds.split(",")])
    print(f"\nmodel: {a.model_rows} rows, {a.model_queries} random queries a rank, C = {a.candidates}")
    print("| W | owners / query | unique ids / query | lookup fetch B/q | lookup score B/q "
          "| update concat B/q | update micro votes B/q |")
    print("|---|---|---|---|---|---|---|")
    for m in res["model"]:
        print(f"| {m['W']} | {m['owners_per_query']:.2f} | {m['unique_ids_per_query']:.1f} | "
              f"{m['fetch_bpq']:.0f} | {m['score_bpq']:.0f} | {m['update_concat_bpq']:.0f} | "
              f"{m['update_votes_bpq']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
