"""Candidate lookup vs exact search for TernaryVQCodebook: recall@1, MSE ratio, lookups per second.

    python bench/vq_quality.py --rows 1000000 --device cuda --append

1. Vectors. `--data lm` (default): hidden states of the embedded corpus (the stdlib byte corpus)
   through a ternary byte LM with the arb-tiny shapes (d_model 64, 2 blocks, seeded random init)
   and a ternary bridge d_model -> 64, one vector per byte position with at least 16 bytes of
   context; training vectors from the train split, evaluation vectors from the val split. This is
   the stand-in for "sequencer + bridge" until the ARB model exists. `--data mixture`: a Gaussian
   mixture (many centres in a random 16-dim subspace plus isotropic noise).
2. The codebook is first trained by its own rule on the training vectors (forward on the
   candidate path at the default candidate_count, backward of the codebook loss, sparse
   `apply_update`), as in the model.
3. Held-out vectors, plus "near-row" queries (a row plus Gaussian noise of a given
   noise-to-signal ratio) are looked up exactly and with each candidate_count. Reported: recall@1
   (candidate id == exact id; ties cannot differ: both take the lowest id), MSE ratio
   (mean ||x - q_candidate||^2 / mean ||x - q_exact||^2) and lookups per second.
4. Optionally (`--timing-rows`), time one lookup batch on a bigger fresh codebook (10M rows).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from arbd.config import get_preset  # noqa: E402
from arbd.ternary import TernaryLinear, TernaryRule  # noqa: E402
from arbd.vq import TernaryVQCodebook  # noqa: E402

CONTEXT = 16


def lm_vectors(n_train: int, n_eval: int, dim: int, device: torch.device, seed: int):
    from arbd.data import load_corpus
    from arbd.model.byte_lm import ByteLM, ternary_layers

    cfg = get_preset("arb-tiny")
    gen = torch.Generator().manual_seed(seed)
    lm = ByteLM(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.expert_hidden,
                layers=ternary_layers("torch", gen)).to(device)
    bridge = TernaryLinear(cfg.d_model, dim, generator=gen).to(device)
    corpus = load_corpus(None)
    seq = 256

    @torch.no_grad()
    def from_split(data, n: int, seed_: int) -> torch.Tensor:
        arr = torch.from_numpy(data.array().copy()) if hasattr(data, "array") else data
        g = torch.Generator().manual_seed(seed_)
        per = seq - CONTEXT
        windows = -(-n // per)
        starts = torch.randint(0, arr.numel() - seq, (windows,), generator=g)
        out = []
        for a in range(0, windows, 256):
            ids = torch.stack([arr[s:s + seq] for s in starts[a:a + 256].tolist()]).long().to(device)
            h = lm.embed(ids)
            for blk in lm.blocks:
                h = blk(h)
            out.append(bridge(lm.norm(h))[:, CONTEXT:].reshape(-1, dim))
        return torch.cat(out)[:n].float()

    return from_split(corpus.train, n_train, seed + 1), from_split(corpus.val, n_eval, seed + 2)


def seq_vectors(n_train: int, n_eval: int, dim: int, device: torch.device, seed: int,
                preset: str = "arb-tiny"):
    """Byte trigrams of the corpus through a stand-in of the ARB text sequencer (ternary byte
    embedding, ternary trigram projection 3E -> d_model, ternary RMSNorm) and the SharedVQ bridge
    (ternary d_model -> 64), seeded random init. The vector of a position depends on its trigram
    only, so each distinct trigram is computed once."""
    from arbd.data import load_corpus
    from arbd.ternary import TernaryEmbeddingTable, TernaryRMSNorm

    cfg = get_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    emb = TernaryEmbeddingTable(256, cfg.byte_embed_dim, generator=gen)
    proj = TernaryLinear(3 * cfg.byte_embed_dim, cfg.d_model, generator=gen)
    norm = TernaryRMSNorm(cfg.d_model)
    bridge = TernaryLinear(cfg.d_model, dim, generator=gen)
    corpus = load_corpus(None)

    @torch.no_grad()
    def from_split(data, n: int, seed_: int) -> torch.Tensor:
        arr = torch.from_numpy(data.array().copy()).long()
        g = torch.Generator().manual_seed(seed_)
        pos = torch.randint(0, arr.numel() - 2, (n,), generator=g)
        codes = arr[pos] * 65536 + arr[pos + 1] * 256 + arr[pos + 2]
        uniq, inv = torch.unique(codes, return_inverse=True)
        tri = torch.stack([uniq // 65536, (uniq // 256) % 256, uniq % 256], 1)
        out = []
        for a in range(0, tri.shape[0], 16384):
            e = emb(tri[a:a + 16384]).reshape(-1, 3 * cfg.byte_embed_dim)
            out.append(bridge(norm(proj(e))))
        return torch.cat(out)[inv].float().to(device)

    return from_split(corpus.train, n_train, seed + 1), from_split(corpus.val, n_eval, seed + 2)


def mixture_vectors(n_train: int, n_eval: int, dim: int, device: torch.device, seed: int,
                    centres: int = 200_000, sub: int = 16, noise: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, sub, generator=g))[0] * math.sqrt(dim / sub)
    c = torch.randn(centres, sub, generator=g) @ basis.t()
    # Zipf-like centre frequencies, as motif frequencies would be.
    w = 1.0 / torch.arange(1, centres + 1).float() ** 0.8

    def draw(n: int) -> torch.Tensor:
        k = torch.multinomial(w, n, replacement=True, generator=g)
        return (c[k] + noise * torch.randn(n, dim, generator=g)).to(device)

    return draw(n_train), draw(n_eval)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def graph_lookup(cb: TernaryVQCodebook, x: torch.Tensor):
    """Capture one candidate lookup in a CUDA graph (no host syncs inside); returns (replay, the
    graph's output tensor)."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            cb.lookup(static, mode="candidates")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cb.lookup(static, mode="candidates")
    graph.replay()
    assert torch.equal(out, cb.lookup(static, mode="candidates"))
    return graph.replay, out


def train(cb: TernaryVQCodebook, data: torch.Tensor, steps: int, batch: int, seed: int) -> list[float]:
    rule = TernaryRule()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g).to(data.device)
        out = cb(data[idx])
        out.codebook_loss.backward()
        cb.apply_update(rule)
        losses.append(float(out.codebook_loss.detach()))
    return losses


@torch.no_grad()
def mse(cb: TernaryVQCodebook, x: torch.Tensor, ids: torch.Tensor) -> float:
    return float((x - cb.decode_rows(ids)).pow(2).sum(-1).mean())


@torch.no_grad()
def quality_rows(cb: TernaryVQCodebook, x: torch.Tensor, counts: list[int], device, repeats: int):
    exact = cb.lookup(x, mode="exact")
    m_exact = mse(cb, x, exact)
    rows = []
    for c in counts:
        cb.candidate_count = c
        ids = cb.lookup(x, mode="candidates")
        rows.append((c, float((ids == exact).float().mean()), mse(cb, x, ids) / m_exact))
    return rows, m_exact


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--data", choices=["seq", "lm", "mixture"], default="seq")
    p.add_argument("--cell-size", type=int, default=None, help="default: the codebook's")
    p.add_argument("--train-candidates", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--train-vectors", type=int, default=2_000_000)
    p.add_argument("--eval-queries", type=int, default=4096)
    p.add_argument("--candidates", default="16,32,64,128,256,512")
    p.add_argument("--noise", default="0.2,0.35,0.5", help="noise/signal ratios of near-row queries")
    p.add_argument("--timing-queries", type=int, default=16384)
    p.add_argument("--timing-rows", type=int, default=0, help="also time lookups at this many rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chunk-mib", type=int, default=None,
                   help="lookup temporaries bound (default 1024 on cuda, 64 on cpu)")
    p.add_argument("--sweep", action="store_true",
                   help="also train one codebook per candidate_count and evaluate it at that count")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels of one lookup")
    p.add_argument("--check-cpu", action="store_true",
                   help="also check that lookups on the device equal lookups on a CPU copy")
    p.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    counts = [int(c) for c in args.candidates.split(",")]
    kw = {} if args.cell_size is None else {"cell_size": args.cell_size}
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    t0 = time.perf_counter()
    make = {"seq": seq_vectors, "lm": lm_vectors, "mixture": mixture_vectors}[args.data]
    train_x, eval_x = make(args.train_vectors, args.eval_queries, args.dim, device, args.seed)
    std = float(train_x.std())
    t_data = time.perf_counter() - t0
    chunk = (args.max_chunk_mib or (1024 if device.type == "cuda" else 64)) << 20
    kw["max_chunk_bytes"] = chunk
    cb = TernaryVQCodebook(args.rows, args.dim, candidate_count=args.train_candidates,
                           exact_max=0, init_std=std, device=device, **kw)
    t_init = time.perf_counter() - t0 - t_data
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU x{torch.get_num_threads()}")
    say(f"### vq_quality: {args.rows:,} x {args.dim}, data={args.data}, "
        f"cell_size={cb.cell_size} (2^{cb.hasher.bits} cells), device={dev_name}")
    say()
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    say(f"Command: `python bench/vq_quality.py {cmd}`")
    say()
    say(f"data std {std:.3f}; vectors {t_data:.1f} s, codebook init {t_init:.1f} s")

    _, m0 = quality_rows(cb, eval_x, [args.train_candidates], device, 1)
    t1 = time.perf_counter()
    losses = train(cb, train_x, args.train_steps, args.batch, args.seed)
    sync(device)
    t_train = time.perf_counter() - t1
    used = int((cb.usage > 0).sum())
    k = max(1, len(losses) // 10)
    say(f"training: {args.train_steps} steps x {args.batch} vectors at candidate_count="
        f"{args.train_candidates}, {t_train:.1f} s; codebook loss first/last "
        f"{sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f}; rows used {used:,} "
        f"({100 * used / args.rows:.1f}%); eval exact MSE {m0:.4f} -> (below)")
    say()

    rows, m_exact = quality_rows(cb, eval_x, counts, device, 1)
    tq = eval_x[: min(args.timing_queries, eval_x.shape[0])]
    if tq.shape[0] < args.timing_queries:
        tq = tq.repeat(-(-args.timing_queries // tq.shape[0]), 1)[: args.timing_queries]
    t_exact = time_it(lambda: cb.lookup(tq, mode="exact"), device, max(1, args.repeats // 5))
    near = {}
    g = torch.Generator().manual_seed(args.seed + 7)
    src = torch.randint(0, args.rows, (args.eval_queries,), generator=g).to(device)
    base = cb.decode_rows(src)
    noise = torch.randn(base.shape, generator=g).to(device)
    for nsr in [float(v) for v in args.noise.split(",")]:
        xq = base + nsr * base.norm(dim=1, keepdim=True) / math.sqrt(args.dim) * noise
        near[nsr] = quality_rows(cb, xq, counts, device, 1)[0]

    say(f"Held-out vectors ({eval_x.shape[0]:,}), exact MSE {m_exact:.4f} (per vector, "
        f"squared L2; data variance per vector {float(eval_x.var(0).sum()):.3f}). "
        f"Timing: one batch of {tq.shape[0]:,} queries, exact {1e3 * t_exact:.1f} ms.")
    say()
    hdr = "| candidate_count | recall@1 | MSE ratio | " + " | ".join(
        f"near-row recall@1 (noise {n})" for n in near) + " | ms / batch | lookups/s |"
    say(hdr)
    say("|" + "---|" * (hdr.count("|") - 1))
    for i, (c, rec, ratio) in enumerate(rows):
        cb.candidate_count = c
        t = time_it(lambda: cb.lookup(tq, mode="candidates"), device, args.repeats)
        nr = " | ".join(f"{near[n][i][1]:.4f}" for n in near)
        say(f"| {c} | {rec:.4f} | {ratio:.4f} | {nr} | {1e3 * t:.2f} | {tq.shape[0] / t:,.0f} |")
    nr = " | ".join("1" for _ in near)
    say(f"| exact | 1 | 1 | {nr} | {1e3 * t_exact:.2f} | {tq.shape[0] / t_exact:,.0f} |")
    say()

    if args.sweep:
        say("Each candidate_count with its own codebook (same init, data and steps), trained and "
            "looked up at that count:")
        say()
        say("| candidate_count | recall@1 | MSE ratio | candidate MSE | exact MSE | rows used | train s |")
        say("|---|---|---|---|---|---|---|")
        for c in counts:
            cbc = TernaryVQCodebook(args.rows, args.dim, candidate_count=c, exact_max=0,
                                    init_std=std, device=device, **kw)
            t1 = time.perf_counter()
            train(cbc, train_x, args.train_steps, args.batch, args.seed)
            sync(device)
            t_c = time.perf_counter() - t1
            rows_c, m_e = quality_rows(cbc, eval_x, [c], device, 1)
            _, rec, ratio = rows_c[0]
            used_c = int((cbc.usage > 0).sum())
            say(f"| {c} | {rec:.4f} | {ratio:.4f} | {ratio * m_e:.4f} | {m_e:.4f} | "
                f"{used_c:,} | {t_c:.1f} |")
            del cbc
        say()

    if args.check_cpu and device.type != "cpu":
        cb.candidate_count = args.train_candidates
        dev_c, dev_e = cb.lookup(eval_x), cb.lookup(eval_x, mode="exact")
        cpu = cb.to("cpu")
        ok_c = bool(torch.equal(cpu.lookup(eval_x.cpu()), dev_c.cpu()))
        ok_e = bool(torch.equal(cpu.lookup(eval_x.cpu(), mode="exact"), dev_e.cpu()))
        cb.to(device)
        say(f"Device vs CPU lookups on the held-out vectors: candidate ids equal {ok_c}, "
            f"exact ids equal {ok_e}.")
        say()

    if args.timing_rows:
        del cb
        t2 = time.perf_counter()
        big = TernaryVQCodebook(args.timing_rows, args.dim, candidate_count=counts[0],
                                exact_max=0, init_std=std, device=device, **kw)
        say(f"Timing on a fresh {args.timing_rows:,}-row codebook (init {time.perf_counter() - t2:.1f} s), "
            f"{tq.shape[0]:,} queries per batch, max_chunk_bytes {chunk >> 20} MiB:")
        say()
        big.check_finite = False  # the NaN/inf check is one host sync; the model keeps it on
        graphs = device.type == "cuda"
        say("| candidate_count | ms / batch (eager) | lookups/s (eager) |"
            + (" ms / batch (CUDA graph) | lookups/s (CUDA graph) |" if graphs else ""))
        say("|---|---|---|" + ("---|---|" if graphs else ""))
        for c in counts:
            big.candidate_count = c
            t = time_it(lambda: big.lookup(tq, mode="candidates"), device, args.repeats)
            row = f"| {c} | {1e3 * t:.3f} | {tq.shape[0] / t:,.0f} |"
            if graphs:
                tg = time_it(graph_lookup(big, tq)[0], device, args.repeats)
                row += f" {1e3 * tg:.3f} | {tq.shape[0] / tg:,.0f} |"
            say(row)
        if graphs:
            t = time_it(lambda: big.lookup(tq, mode="exact"), device, 1)
            say(f"| exact | {1e3 * t:.1f} | {tq.shape[0] / t:,.0f} |" + (" | |"))
        say()
        if args.profile and graphs:
            big.candidate_count = args.train_candidates
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                big.lookup(tq, mode="candidates")
                sync(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))

    if args.append:
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
