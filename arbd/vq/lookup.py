"""Codebook lookup as separate stages, so a sharded codebook can swap one of them.

    candidates: quantize_queries -> candidate_ids -> fetch_rows -> candidate_scores (decode fused
                with the dot product through per-query byte tables) -> select_best
    exact:      quantize_queries -> [fetch_range -> decode_rows -> block_scores -> running best]
                per chunk of rows

Only `fetch_rows` / `fetch_range` touch the codebook's storage; they return packed bytes and int8
exponents, which is also what a remote owner would send. Everything after them is local arithmetic
on those bytes, identical in every layout.

Exact arithmetic. The squared distance to a row w = s * t (trits t, scale s = 2**(E/16)) is
||x||^2 - 2 s x.t + s^2 nnz(t); ||x||^2 is the same for every row, so the score is
    score = (s * s) * nnz(t) - (2 * (s * u)) * D,    D = xq . t,   x ~= u * xq
where each query is first rounded to integers xq with |xq| <= 2**Q (Q = 23 - ceil(log2 dim), 17
bits for dim 64) times a power-of-two unit u. Then every product and partial sum in D is an integer
below 2**24, so D is exact in float32 in any summation order (matmul, chunked, blocked, another
device) and the score is a fixed sequence of correctly rounded elementwise float32 operations.
Result: the score of a (query, row) pair is bit-identical however rows are fetched, batched or
chunked, and ties are broken by the lowest row id, so exact, chunked-exact, candidate and sharded
lookups agree exactly on the rows they share. The rounding of x costs at most 2**-Q of its largest
coordinate, far below what a ternary row can resolve.

On CUDA the candidate stages run as one Triton kernel (arbd/vq/triton_lookup.py, same arithmetic,
same ids) unless `use_triton=False` or ARBD_VQ_TRITON=0; CPU keeps the torch stages.
"""
from __future__ import annotations

import math
import os

import torch

from arbd.ternary import packing
from arbd.vq.hashing import CellLayout, SignHash

INT64_MAX = torch.iinfo(torch.int64).max


def query_bits(dim: int) -> int:
    """Q such that dim * 2**Q <= 2**23: sums of dim terms |xq_i| <= 2**Q stay exact in float32."""
    return 23 - math.ceil(math.log2(max(dim, 1)))


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float32 powers of two 2**k for integer k in [-126, 127], built from the bit pattern
    (pow/ldexp kernels are not promised to be exact on every device)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def quantize_queries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, dim] float -> (xq float32 [N, dim] holding integers in [-2**Q, 2**Q], unit float32 [N])
    with x ~= xq * unit[:, None]; unit is a power of two chosen from the row's largest |x_i|."""
    xf = x.detach().to(torch.float32)
    _, e = torch.frexp(xf.abs().amax(dim=-1))          # max|x| = m * 2**e, m in [0.5, 1)
    shift = (query_bits(x.shape[-1]) - e).clamp(-126, 126)
    xq = torch.round(xf * pow2(shift)[:, None])
    return xq, pow2(-shift)


# -- candidates ------------------------------------------------------------------------------

def triton_plan(xq: torch.Tensor, hasher: SignHash, layout: CellLayout, candidate_count: int,
                use_triton: bool | None = None) -> dict | None:
    """The fused kernel's compile-time sizes when it should run (CUDA, Triton importable, a
    supported shape, not switched off), else None. use_triton=True also allows it on CPU, which
    only works under TRITON_INTERPRET=1 (the tests' way)."""
    if use_triton is False or (use_triton is None and (xq.device.type != "cuda"
                                                      or os.environ.get("ARBD_VQ_TRITON") == "0")):
        return None
    try:
        from arbd.vq import triton_lookup
    except ImportError:
        return None
    return triton_lookup.plan(xq.shape[-1], hasher, layout, candidate_count)


def candidate_ids(xq: torch.Tensor, hasher: SignHash, layout: CellLayout,
                  candidate_count: int, use_triton: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [N, C], valid bool [N, C]) for integer queries xq.

    The rows of the probed cells, in probe order and then row order, fill the C slots; enough
    probes are asked for that even cells of the smallest size fill them. Slots left over (only when
    the probes run out, i.e. every cell was probed) are invalid and hold a harmless in-range id.
    Different probes are different cells, so the valid ids of a query are distinct.
    """
    cfg = triton_plan(xq, hasher, layout, candidate_count, use_triton)
    if cfg is not None:
        from arbd.vq import triton_lookup
        return triton_lookup.candidate_ids(xq, hasher, layout, candidate_count, cfg)
    n = xq.shape[0]
    smallest = max(1, layout.num_codes // layout.num_cells)
    probes = min(-(-candidate_count // smallest), layout.num_cells)
    cells = hasher.probe_cells(hasher.projections(xq), probes)             # [N, P]
    start = layout.cell_start(cells)
    size = layout.cell_start(cells + 1) - start
    filled = size.cumsum(1)                                                 # slots used after probe k
    slot = torch.arange(candidate_count, device=xq.device).expand(n, candidate_count)
    k = torch.searchsorted(filled, slot.contiguous(), right=True)          # probe that holds the slot
    valid = k < cells.shape[1]
    k = k.clamp_max(cells.shape[1] - 1)
    ids = start.gather(1, k) + slot - (filled.gather(1, k) - size.gather(1, k))
    return torch.where(valid, ids, start[:, :1]), valid


# -- fetch: the only stage that reads codebook storage ----------------------------------------

def fetch_rows(packed: torch.Tensor, exponent: torch.Tensor,
               ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes [..., nb] and exponents [...] of the rows `ids` (any shape)."""
    return packed[ids], exponent[ids]


def fetch_range(packed: torch.Tensor, exponent: torch.Tensor,
                start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start, end) as views (exact search walks the table in such chunks)."""
    return packed[start:end], exponent[start:end]


# -- decode and score --------------------------------------------------------------------------

_DECODE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _decode_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Per byte value: its 5 trits as float32, and how many of them are non-zero. The same digit
    # table as packing.unpack_trits (tested equal); float output saves a conversion pass.
    t = _DECODE.get(device)
    if t is None:
        trits = packing.unpack_trits(torch.arange(256, dtype=torch.uint8)[:, None], 5)
        t = _DECODE[device] = (trits.to(torch.float32).to(device),
                               (trits != 0).sum(1, dtype=torch.int32).to(device))
    return t


def decode_rows(packed: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes [..., nb] -> (trits float32 [..., dim], nnz int32 [...])."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != packing.packed_cols(dim):
        raise ValueError(f"packed rows must be uint8 [..., {packing.packed_cols(dim)}], "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    table, nnz_table = _decode_tables(packed.device)
    idx = packed.long()
    trits = table[idx].flatten(-2)[..., :dim]
    return trits, nnz_table[idx].sum(-1, dtype=torch.int32)


def _score(row_term: torch.Tensor, su2: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    # One fixed sequence of rounded float32 operations, shared by every path (no fused alpha/FMA).
    # su2 = (2 u) * s is exact (u is a power of two), so only su2 * dot and the difference round.
    return row_term - su2 * dot


def _row_term(exponent: torch.Tensor, nnz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = packing.exponent_to_scale(exponent, torch.float32)
    return (s * s) * nnz.to(torch.float32), s


def byte_tables(xq: torch.Tensor) -> torch.Tensor:
    """float32 [N, nb, 256]: entry [n, b, v] is the dot of query n's coordinates 5b..5b+4 with the
    five trits of byte value v. Exact (sums of 5 integers below 2**18), whatever the matmul."""
    n, d = xq.shape
    nb = packing.packed_cols(d)
    xb = torch.nn.functional.pad(xq, (0, nb * 5 - d)).view(n, nb, 5)
    digits = _decode_tables(xq.device)[0]                                     # [256, 5]
    if _fp32_matmul_is_exact(xq.device):
        return xb @ digits.t()
    return (xb.double() @ digits.double().t()).to(torch.float32)


def candidate_scores(xq: torch.Tensor, unit: torch.Tensor, packed: torch.Tensor,
                     exponent: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [N, C] scores of per-query packed rows [N, C, nb]; invalid slots score +inf.

    Decoding and the dot product are fused: D[n, c] = sum_b T[n, b, packed[n, c, b]] with the
    query's byte tables T, i.e. 13 table reads per row instead of 64 decoded trits. Every term is
    an integer, so D equals the trit-by-trit dot exactly.
    """
    idx = packed.long()
    dot = torch.gather(byte_tables(xq), 2, idx.transpose(1, 2)).sum(1)      # [N, C]
    nnz = _decode_tables(packed.device)[1][idx].sum(-1, dtype=torch.int32)
    row_term, s = _row_term(exponent, nnz)
    score = _score(row_term, (unit * 2.0)[:, None] * s, dot)
    if valid is not None:
        score = score.masked_fill(~valid, math.inf)
    return score


def _fp32_matmul_is_exact(device: torch.device) -> bool:
    """False where float32 matmuls may run at reduced precision (TF32, bf16): then D is computed
    in float64 instead, which is exact for these integers under any setting."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda":
        m = torch.backends.cuda.matmul
        return not m.allow_tf32 and getattr(m, "fp32_precision", "none") in ("none", "ieee")
    if device.type == "cpu":
        return getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none") in ("none", "ieee")
    return False


def block_scores(xq: torch.Tensor, unit: torch.Tensor, trits: torch.Tensor, nnz: torch.Tensor,
                 exponent: torch.Tensor) -> torch.Tensor:
    """float32 [N, R] scores of every query against a shared block of rows (trits [R, dim])."""
    if _fp32_matmul_is_exact(xq.device):
        dot = xq @ trits.t()
    else:
        dot = (xq.double() @ trits.double().t()).to(torch.float32)
    row_term, s = _row_term(exponent, nnz)
    return _score(row_term[None, :], (unit * 2.0)[:, None] * s[None, :], dot)


def select_best(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best id [N], best score [N]): the lowest score; among equal scores, the lowest row id."""
    best = scores.amin(dim=-1, keepdim=True)
    ids = ids.expand_as(scores)
    chosen = torch.where(scores == best, ids, torch.full_like(ids, INT64_MAX)).amin(dim=-1)
    return chosen, best.squeeze(-1)


# -- the two searches ------------------------------------------------------------------------------

def candidate_search(xq: torch.Tensor, unit: torch.Tensor, packed: torch.Tensor,
                     exponent: torch.Tensor, dim: int, hasher: SignHash, layout: CellLayout,
                     candidate_count: int, max_chunk_bytes: int,
                     fetch=fetch_rows, use_triton: bool | None = None) -> tuple[torch.Tensor, int]:
    """Best candidate id per query, and the number of rows fetched. Queries are processed in
    blocks so that the per-block temporaries (byte tables [n, nb, 256] and [n, C, nb] gathers,
    float32 and int64) stay under max_chunk_bytes. With the default fetch on CUDA, one fused
    Triton launch does it all (no temporaries, the same ids)."""
    n = xq.shape[0]
    cfg = triton_plan(xq, hasher, layout, candidate_count, use_triton) if fetch is fetch_rows else None
    if cfg is not None:
        from arbd.vq import triton_lookup
        ids = triton_lookup.candidate_search(xq, unit, packed, exponent, hasher, layout, cfg)
        return ids, n * candidate_count
    nb = packing.packed_cols(dim)
    per_query = nb * (256 * 4 + candidate_count * 8 * 3)
    block = max(1, min(n, max_chunk_bytes // per_query))
    out, fetched = [], 0
    for a in range(0, n, block):
        q, u = xq[a:a + block], unit[a:a + block]
        ids, valid = candidate_ids(q, hasher, layout, candidate_count, use_triton)
        rows, exps = fetch(packed, exponent, ids)
        fetched += ids.numel()
        out.append(select_best(candidate_scores(q, u, rows, exps, valid), ids)[0])
    return torch.cat(out) if out else xq.new_zeros(0, dtype=torch.int64), fetched


def search_candidates(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, dim: int,
                      hasher: SignHash, layout: CellLayout, candidate_count: int,
                      max_chunk_bytes: int, use_triton: bool | None = None) -> tuple[torch.Tensor, int]:
    """quantize_queries + candidate_search for raw float queries x [N, dim]. On the fused Triton
    path the kernel quantizes x itself (the same rounding), which saves ~10 small launches."""
    cfg = triton_plan(x, hasher, layout, candidate_count, use_triton)
    if cfg is not None:
        from arbd.vq import triton_lookup
        ids = triton_lookup.candidate_search(x, None, packed, exponent, hasher, layout, cfg,
                                             quantize=True)
        return ids, x.shape[0] * candidate_count
    xq, unit = quantize_queries(x)
    return candidate_search(xq, unit, packed, exponent, dim, hasher, layout, candidate_count,
                            max_chunk_bytes, use_triton=False)


def exact_search(xq: torch.Tensor, unit: torch.Tensor, packed: torch.Tensor,
                 exponent: torch.Tensor, dim: int, max_chunk_bytes: int,
                 fetch=fetch_range) -> torch.Tensor:
    """Best row of the whole table per query, scanning row chunks so that no [n, rows] float
    matrix above max_chunk_bytes exists (8 bytes per entry budgeted: the float64 fallback).
    Later chunks win only on a strictly lower score, so ties keep the lowest id, as unchunked."""
    n, rows = xq.shape[0], packed.shape[0]
    qblock = max(1, min(n, max_chunk_bytes // (8 * 256)))       # keep at least 256 rows a chunk
    rblock = max(1, min(rows, max_chunk_bytes // (8 * qblock)))
    out = []
    for a in range(0, n, qblock):
        q, u = xq[a:a + qblock], unit[a:a + qblock]
        best_id = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
        best = torch.full((q.shape[0],), math.inf, dtype=torch.float32, device=q.device)
        for r0 in range(0, rows, rblock):
            r1 = min(rows, r0 + rblock)
            prow, exps = fetch(packed, exponent, r0, r1)
            trits, nnz = decode_rows(prow, dim)
            scores = block_scores(q, u, trits, nnz, exps)
            # Rows of a block are in id order, so argmin's first minimum is the lowest id.
            arg = scores.argmin(dim=1, keepdim=True)
            cbest, cid = torch.gather(scores, 1, arg).squeeze(1), arg.squeeze(1) + r0
            better = cbest < best
            best_id = torch.where(better, cid, best_id)
            best = torch.where(better, cbest, best)
        out.append(best_id)
    return torch.cat(out) if out else xq.new_zeros(0, dtype=torch.int64)
