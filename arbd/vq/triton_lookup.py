"""Candidate lookup as one Triton kernel: hash, candidate ids, row gather, decode, score, argmin.

One program handles one query. It reproduces `lookup.candidate_ids` and `lookup.candidate_scores`
+ `select_best` operation for operation, so the chosen ids are identical to the torch path:

- hash: p_j = sum of the signed coordinates of group j, as int32 (the torch path sums the same
  integers in float32; both are exact, |p_j| < 2**23);
- probes: the m least confident bits by the key |p_j| * 64 + j, every subset of them costed, the
  subsets ordered by the unique key cost * 2**m + subset (tl.sort; the keys are unique, so any
  correct sort gives the torch order), the first P kept;
- slots: cells of the probes in order fill the C slots (cumsum of cell sizes, then for each slot
  the probe whose interval holds it; the same as the torch searchsorted, cells are never empty);
- score: D = xq . t in int32 (exact), then (s*s)*nnz - ((2u)*s)*D as separate float32 roundings
  (launched with enable_fp_fusion=False so no FMA merges them), invalid slots +inf, lowest score,
  ties to the lowest id.

The kernel can also stop after the ids (writes ids and valid) or start from given ids (the
"score only" entry), which the tests use to check each half against its torch twin.

Subnormals: Triton may flush float32 subnormals to zero where torch keeps them. Scores differ
only if a query's largest coordinate is itself below ~2**-100 (then (2u)*s*D underflows), and even
there the product is ~2**-85 of the row term, which it cannot change. Such queries are not
meaningful inputs; the codebook's tests use normal floats.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from arbd.ternary import packing
from arbd.vq.hashing import CellLayout, SignHash

_INT64_MAX = tl.constexpr(9223372036854775807)
_INT32_MAX = tl.constexpr(2147483647)
_RNE = tl.constexpr(12582912.0)       # 1.5 * 2**23: (v + RNE) - RNE rounds |v| <= 2**22 half-to-even
_ZERO_BYTE = tl.constexpr(121)        # five zero trits (digits 1, 1, 1, 1, 1)


@triton.jit
def _query_scale(x_ptr, unit_ptr, n, DIM: tl.constexpr, DIM_P: tl.constexpr, Q: tl.constexpr,
                 QUANTIZE: tl.constexpr):
    """(scale, unit) of query n: xq = round(x * scale), x ~= xq * unit (lookup.quantize_queries).
    Without QUANTIZE, x already holds xq and unit is read."""
    if QUANTIZE:
        i = tl.arange(0, DIM_P)
        x = tl.load(x_ptr + n * DIM + i, mask=i < DIM, other=0.0).to(tl.float32)
        m = tl.max(tl.abs(x), axis=0)
        # frexp exponent from the bit pattern; subnormal maxima clamp to the same shift as frexp's
        e = tl.where(m == 0.0, 0, ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126)
        shift = tl.minimum(tl.maximum(Q - e, -126), 126)
        scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)
        unit = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    else:
        scale = 1.0
        unit = tl.load(unit_ptr + n)
    return scale, unit


@triton.jit
def _xq_at(x_ptr, n, offs, mask, scale, DIM: tl.constexpr, QUANTIZE: tl.constexpr):
    """int32 quantized coordinates offs of query n (0 where ~mask)."""
    x = tl.load(x_ptr + n * DIM + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANTIZE:
        x = ((x * scale) + _RNE) - _RNE
    return x.to(tl.int32)


@triton.jit
def _candidates(x_ptr, n, scale, sign_ptr, num_codes, DIM: tl.constexpr, QUANTIZE: tl.constexpr,
                BITS: tl.constexpr, BITS_P: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                M: tl.constexpr, M_P: tl.constexpr, NSUB: tl.constexpr, KEEP: tl.constexpr,
                KEEP_P: tl.constexpr, LOG_KEEP_P: tl.constexpr, C: tl.constexpr,
                C_P: tl.constexpr):
    """(ids int64 [C_P], valid [C_P]) of query n."""
    # Hash: bit j sums the G consecutive coordinates of group j, loaded as a [bits, G] tile.
    j = tl.arange(0, BITS_P)
    g = tl.arange(0, G_P)
    coord = j[:, None] * G + g[None, :]
    ok = (j[:, None] < BITS) & (g[None, :] < G)
    xq = _xq_at(x_ptr, n, coord, ok, scale, DIM, QUANTIZE)
    p = tl.sum(xq * tl.load(sign_ptr + coord, mask=ok, other=0), axis=1)         # [BITS_P]
    base = tl.sum(tl.where(p > 0, 1 << j, 0), axis=0)
    # The M least confident bits, least first (unique keys: bit index in the low 6 bits).
    ordered = tl.sort(tl.where(j < BITS, tl.abs(p) * 64 + j, _INT32_MAX), 0)
    low = _head(ordered, BITS_P, M_P)
    k = tl.arange(0, M_P)
    conf_k = tl.where(k < M, low >> 6, 0)
    flip_k = tl.where(k < M, 1 << (low & 31), 0)             # low & 63 < BITS <= 30 where k < M
    # Every subset s of them (bit k of s flips the k-th least confident bit), cheapest first.
    s = tl.arange(0, NSUB)
    cost = tl.sum(tl.where(((s[:, None] >> k[None, :]) & 1) != 0, conf_k[None, :], 0), axis=1)
    sub = _head(tl.sort(cost * NSUB + s, 0), NSUB, KEEP_P) & (NSUB - 1)
    flips = tl.sum(tl.where(((sub[:, None] >> k[None, :]) & 1) != 0, flip_k[None, :], 0), axis=1)
    q = tl.arange(0, KEEP_P)
    cell = (base ^ flips).to(tl.int64)
    start = (cell * num_codes) >> BITS                          # CellLayout.cell_start
    size = tl.where(q < KEEP, (((cell + 1) * num_codes) >> BITS) - start, 0).to(tl.int32)
    filled = tl.cumsum(size, 0)
    start32 = start.to(tl.int32)
    # Slot c belongs to probe #{filled <= c} (torch's searchsorted, right=True): binary search.
    c = tl.arange(0, C_P)
    kk = tl.zeros((C_P,), dtype=tl.int32)
    for e in tl.static_range(LOG_KEEP_P):
        step = KEEP_P >> (e + 1)
        kk = tl.where(tl.gather(filled, kk + (step - 1), 0) <= c, kk + step, kk)
    kk = tl.where(tl.gather(filled, kk, 0) <= c, kk + 1, kk)
    valid = (kk < KEEP) & (c < C)
    offset = tl.gather(start32 - filled + size, tl.minimum(kk, KEEP_P - 1), 0)
    own = tl.sum(tl.where(q == 0, start32, 0), axis=0)
    ids = tl.where(valid, c + offset, own)
    return ids.to(tl.int64), valid


@triton.jit
def _head(v, N: tl.constexpr, H: tl.constexpr):
    """The first H of the N elements of v (H divides N): row 0 of v seen as [N // H, H]."""
    r = tl.arange(0, N // H)
    return tl.sum(tl.where(r[:, None] == 0, tl.reshape(v, (N // H, H)), 0), axis=0)


@triton.jit
def _lookup_kernel(x_ptr, unit_ptr, sign_ptr, packed_ptr, exp_ptr, scale_ptr, ids_ptr, valid_ptr,
                   out_ptr, num_codes,
                   DIM: tl.constexpr, DIM_P: tl.constexpr, Q: tl.constexpr, NB: tl.constexpr,
                   NB_P: tl.constexpr, BITS: tl.constexpr, BITS_P: tl.constexpr, G: tl.constexpr,
                   G_P: tl.constexpr, M: tl.constexpr, M_P: tl.constexpr, NSUB: tl.constexpr,
                   KEEP: tl.constexpr, KEEP_P: tl.constexpr, LOG_KEEP_P: tl.constexpr,
                   C: tl.constexpr, C_P: tl.constexpr, QUANTIZE: tl.constexpr,
                   COMPUTE_IDS: tl.constexpr, STORE_IDS: tl.constexpr, SCORE: tl.constexpr,
                   S_P: tl.constexpr, S_E: tl.constexpr):
    # S_P, S_E: row strides of packed and exponent (NB and 1, or a row record's width)
    n = tl.program_id(0).to(tl.int64)
    scale, unit = _query_scale(x_ptr, unit_ptr, n, DIM, DIM_P, Q, QUANTIZE)
    c = tl.arange(0, C_P)
    if COMPUTE_IDS:
        ids, valid = _candidates(x_ptr, n, scale, sign_ptr, num_codes, DIM, QUANTIZE, BITS,
                                 BITS_P, G, G_P, M, M_P, NSUB, KEEP, KEEP_P, LOG_KEEP_P, C, C_P)
        if STORE_IDS:
            tl.store(ids_ptr + n * C + c, ids, mask=c < C)
            tl.store(valid_ptr + n * C + c, valid.to(tl.int8), mask=c < C)
    else:
        ids = tl.load(ids_ptr + n * C + c, mask=c < C, other=0)
        valid = tl.load(valid_ptr + n * C + c, mask=c < C, other=0) != 0
    if SCORE:
        b = tl.arange(0, NB_P)
        rows = tl.load(packed_ptr + ids[:, None] * S_P + b[None, :],
                       mask=(b[None, :] < NB) & (c[:, None] < C), other=_ZERO_BYTE).to(tl.int32)
        rows = tl.where(rows > 242, _ZERO_BYTE, rows)          # invalid bytes decode to zeros
        dot = tl.zeros((C_P, NB_P), dtype=tl.int32)
        nnz = tl.zeros((C_P, NB_P), dtype=tl.int32)
        for d in tl.static_range(5):
            xd = _xq_at(x_ptr, n, b * 5 + d, b * 5 + d < DIM, scale, DIM, QUANTIZE)
            t = rows % 3 - 1
            rows = rows // 3
            dot += t * xd[None, :]
            nnz += (t != 0).to(tl.int32)
        dot_f = tl.sum(dot, axis=1).to(tl.float32)
        nnz_f = tl.sum(nnz, axis=1).to(tl.float32)
        e = tl.load(exp_ptr + ids * S_E, mask=c < C, other=0).to(tl.int32)
        s = tl.load(scale_ptr + e + 128)
        row_term = (s * s) * nnz_f
        su2 = (unit * 2.0) * s
        score = tl.where(valid, row_term - su2 * dot_f, float("inf"))
        best = tl.min(score, axis=0)
        chosen = tl.min(tl.where(score == best, ids, _INT64_MAX), axis=0)
        tl.store(out_ptr + n, chosen)


def _p2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(v, 1))))


def plan(dim: int, hasher: SignHash, layout: CellLayout, candidate_count: int) -> dict | None:
    """Compile-time sizes for this codebook, or None where the kernel does not apply (the torch
    path then runs): no hash bits or one probe, more than 30 bits, int32 subset keys that could
    overflow (the same bound hashing.probe_cells uses), ids or byte offsets beyond int32/int64
    care, or tiles too large to keep in registers."""
    from arbd.vq import lookup

    bits, n = hasher.bits, layout.num_codes
    smallest = max(1, n // layout.num_cells)
    probes = min(-(-candidate_count // smallest), layout.num_cells)
    if bits == 0 or probes <= 1 or bits > 30 or dim < 2 or n >= 2 ** 31:
        return None
    m = min(bits, math.ceil(math.log2(probes)) + 1)
    if (m * hasher.group_size * (1 << 23) // dim + 1) << m >= 2 ** 31:
        return None
    keep = min(probes, 1 << m)
    cfg = dict(DIM=dim, DIM_P=_p2(dim), Q=lookup.query_bits(dim), NB=packing.packed_cols(dim),
               NB_P=_p2(packing.packed_cols(dim)), BITS=bits, BITS_P=_p2(bits),
               G=hasher.group_size, G_P=_p2(hasher.group_size), M=m, M_P=_p2(m), NSUB=1 << m,
               KEEP=keep, KEEP_P=_p2(keep), LOG_KEEP_P=_p2(keep).bit_length() - 1,
               C=candidate_count, C_P=_p2(candidate_count))
    if cfg["C_P"] * cfg["NB_P"] > 1 << 15 or cfg["NSUB"] * cfg["M_P"] > 1 << 15:
        return None
    return cfg


def _scales(device: torch.device) -> torch.Tensor:
    # The 256 float32 scales of packing.exponent_to_scale, indexed by E + 128.
    return packing.exponent_to_scale_table(device, torch.float32)


def _signs(hasher: SignHash, device: torch.device) -> torch.Tensor:
    # int32 [bits * g], cached by the hasher itself (a cache keyed by id(hasher) would hand a new
    # hasher the signs of a dead one that had the same id).
    return hasher._signs_on(device, torch.int32).reshape(-1)


def _launch(x: torch.Tensor, unit: torch.Tensor | None, cfg: dict, hasher: SignHash,
            num_codes: int, *, packed=None, exponent=None, ids=None, valid=None, out=None,
            quantize: bool, compute_ids: bool, store_ids: bool, score: bool,
            num_warps: int = 4) -> None:
    dev = x.device
    dummy = x.new_zeros(1)
    scales = _scales(dev)
    _lookup_kernel[(x.shape[0],)](
        x, unit if unit is not None else dummy, _signs(hasher, dev),
        packed if packed is not None else dummy, exponent if exponent is not None else dummy,
        scales, ids if ids is not None else dummy, valid if valid is not None else dummy,
        out if out is not None else dummy, num_codes,
        QUANTIZE=quantize, COMPUTE_IDS=compute_ids, STORE_IDS=store_ids, SCORE=score,
        S_P=packed.stride(0) if packed is not None else cfg["NB"],
        S_E=exponent.stride(0) if exponent is not None else 1,
        num_warps=num_warps, enable_fp_fusion=False, **cfg)


def candidate_ids(xq: torch.Tensor, hasher: SignHash, layout: CellLayout, candidate_count: int,
                  cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of lookup.candidate_ids for integer queries xq (float32 [N, dim])."""
    n = xq.shape[0]
    ids = torch.empty(n, candidate_count, dtype=torch.int64, device=xq.device)
    valid = torch.empty(n, candidate_count, dtype=torch.int8, device=xq.device)
    if n:
        _launch(xq.contiguous(), None, cfg, hasher, layout.num_codes, ids=ids, valid=valid,
                quantize=False, compute_ids=True, store_ids=True, score=False)
    return ids, valid.bool()


def best_of(xq: torch.Tensor, unit: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor,
            ids: torch.Tensor, valid: torch.Tensor, cfg: dict, hasher: SignHash) -> torch.Tensor:
    """Triton twin of select_best(candidate_scores(...), ids)[0] for given candidate ids."""
    n = xq.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=xq.device)
    if n:
        _launch(xq.contiguous(), unit.contiguous(), cfg, hasher, packed.shape[0],
                packed=packed, exponent=exponent, ids=ids.contiguous(),
                valid=valid.to(torch.int8).contiguous(), out=out,
                quantize=False, compute_ids=False, store_ids=False, score=True)
    return out


def candidate_search(x: torch.Tensor, unit: torch.Tensor | None, packed: torch.Tensor,
                     exponent: torch.Tensor, hasher: SignHash, layout: CellLayout, cfg: dict,
                     *, quantize: bool = False, num_warps: int = 4) -> torch.Tensor:
    """Best candidate id per query in one launch. x is xq (with unit) or, with quantize=True,
    the raw float queries (quantized in the kernel exactly as lookup.quantize_queries does)."""
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n:
        _launch(x.contiguous(), None if quantize else unit.contiguous(), cfg, hasher,
                layout.num_codes, packed=packed, exponent=exponent, out=out, quantize=quantize,
                compute_ids=True, store_ids=False, score=True, num_warps=num_warps)
    return out


# -- packed-row gather ----------------------------------------------------------------------------

@triton.jit
def _gather_kernel(src_ptr, ids_ptr, out_ptr, n, W: tl.constexpr, W_P: tl.constexpr,
                   BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = r < n
    row = tl.load(ids_ptr + r, mask=live, other=0)
    col = tl.arange(0, W_P)
    m = live[:, None] & (col[None, :] < W)
    v = tl.load(src_ptr + row[:, None] * W + col[None, :], mask=m)
    tl.store(out_ptr + r[:, None] * W + col[None, :], v, mask=m)


def gather_rows(table: torch.Tensor, ids: torch.Tensor, block: int = 256,
                num_warps: int = 4) -> torch.Tensor:
    """table[ids] for a 2-D table of fixed-width rows (packed trits: uint8 [R, nb]).

    Rows are copied in the widest word that divides the row and the base address (16-byte rows:
    one 128-bit load per row), where torch's index_select copies byte by byte. No bounds check:
    ids must be in [0, R) (candidate ids are, by construction)."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"gather_rows needs a contiguous 2-D table, got {tuple(table.shape)}")
    nbytes = table.shape[1] * table.element_size()
    word = next(w for w in (8, 4, 2, 1) if nbytes % w == 0 and table.data_ptr() % w == 0)
    wdt = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[word]
    src = table.view(torch.uint8).view(table.shape[0], nbytes).view(wdt)
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.shape[0], src.shape[1], dtype=wdt, device=table.device)
    if flat.numel():
        w = src.shape[1]
        _gather_kernel[(triton.cdiv(flat.numel(), block),)](src, flat, out, flat.numel(), W=w,
                                                           W_P=_p2(w), BLOCK=block,
                                                           num_warps=num_warps)
    return out.view(table.dtype).view(*ids.shape, table.shape[1])
