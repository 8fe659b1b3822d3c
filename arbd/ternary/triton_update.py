"""GPU kernels for the ternary update (issue 10): the fused dense update of a whole matrix, and the
touched-row update of sparse (codebook) rows at the end of the file.

Dense: float evidence in, new state out.

`dense_update_many` does what TernaryMatrix.apply_update does for dense float32 evidence of
whole, unsharded matrices (quantize_evidence + scale_votes + apply_votes + pack), bit for bit,
for every matrix of one column count at once (update.apply_updates groups the step's matrices):

1. `_row_sums_kernel`: per row, sum |g| and sum g * t in float64, as the rule does, and dL/dE.
   rule.py sums in float64 so that the kernel's order of the terms leaves the float32 result
   alone (it could move only for a sum within ~1e-16 of a float32 rounding boundary).
2. `_matrix_means_kernel` (only when the rule needs a per-matrix mean: "tensor" norm rows, or
   scale_mode "norm"): one program per matrix.
3. `_group_update_kernel`: per element x = -g / (s_row + 1e-30) * rate (correctly rounded
   division, no FMA contraction), the hash uniform of rule.hash_uniform, the vote, the integer
   accumulator rule, the repacked byte; per row the scale vote (rounded with the same hash at
   position = row) and the exponent step. Counts (trit flips, scale moves) stay on the device.

Tiles cover BLOCK_R rows x BLOCK_B packed bytes. Each byte's five base-3 digits are walked one
at a time (digit d of byte b is column 5b + d), so no gather is needed to unpack or repack.
Integer divisions act on magnitudes (truncation toward zero, like torch's rounding_mode="trunc"),
which keeps the interpreter (NumPy floor division) and the GPU (C truncation) in agreement.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from arbd.config import SCALE_K, TRITS_PER_BYTE
from arbd.ternary import cuda_rows, packing
from arbd.ternary.rule import ACC_MAX, MIN_ROW_FOR_ROW_NORM, TernaryRule, _salt_mix
from arbd.ternary.triton_kernels import _sm_count as _cuda_sm_count

assert TRITS_PER_BYTE == 5, "triton_update assumes 5 trits per byte"

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: fp32 x + M - M rounds half to even


@triton.jit
def _trunc_div(a, d):
    # Truncation toward zero, as torch's rounding_mode="trunc" (see the module docstring).
    q = tl.abs(a) // d
    return tl.where(a < 0, -q, q)


@triton.jit
def _trit_moves(acc, trit, THRESHOLD: tl.constexpr):
    """rule.apply_votes: how far each trit moves (-2..2, kept inside -1..1) for accumulators acc."""
    return tl.minimum(tl.maximum(_trunc_div(acc, THRESHOLD), -1 - trit), 1 - trit)


@triton.jit
def _settle(acc, trit, n, THRESHOLD: tl.constexpr, CAP: tl.constexpr, ACC_MAX: tl.constexpr):
    """rule.apply_votes once the moves n are known: the new trits and accumulators (spent votes
    removed, saturated trits capped, the int8 range kept)."""
    trit = trit + n
    acc = acc - n * THRESHOLD
    if CAP < ACC_MAX:
        acc = tl.where((trit == 1) & (acc > CAP), CAP,
                       tl.where((trit == -1) & (acc < -CAP), -CAP, acc))
    return trit, tl.minimum(tl.maximum(acc, -ACC_MAX), ACC_MAX)


@triton.jit
def _scale_step(ea, e, live, S_THRESHOLD: tl.constexpr, ACC_MAX: tl.constexpr):
    """The exponent half of the rule for rows (live masks the tail): (exponent moves, new ea)."""
    m = tl.minimum(tl.maximum(_trunc_div(ea, S_THRESHOLD), -128 - e), 127 - e)
    m = tl.where(live, m, 0)
    return m, tl.minimum(tl.maximum(ea - m * S_THRESHOLD, -ACC_MAX), ACC_MAX)


@triton.jit
def _mix32(x):
    # arbd.hashing.mix32 on uint32: the products wrap mod 2**32 exactly as `& M32` does there.
    x = x ^ (x >> 16)
    x = x * 0x045D9F3B
    x = x ^ (x >> 16)
    x = x * 0x045D9F3B
    return x ^ (x >> 16)


@triton.jit
def _sround(x, pos, salt, STOCHASTIC: tl.constexpr, MAX_VOTE: tl.constexpr):
    """rule._sround + clamp of fp32 x at hash positions pos (uint32), as int32 votes."""
    if STOCHASTIC:
        coarse = ((x.to(tl.int32, bitcast=True) >> 16) & 0xFFFF).to(tl.uint32)
        h = _mix32(coarse ^ _mix32(pos ^ 0x5BD1E995) ^ salt)
        q = tl.floor(x + (h >> 8).to(tl.float32) * tl.full((), 1.0 / (1 << 24), tl.float32))
    else:
        # torch.round (half to even); clamping first keeps |x| in the trick's range and
        # changes no clamped result.
        magic = tl.full((), _ROUND_MAGIC, tl.float32)
        q = (tl.minimum(tl.maximum(x, -256.0), 256.0) + magic) - magic
    return tl.minimum(tl.maximum(q, -MAX_VOTE), MAX_VOTE).to(tl.int32)


# A group is every matrix of the step with the same column count (COLS is a compile-time
# constant). Its rows are numbered one after another (group rows). `tab` int64 [n, TAB] holds per
# matrix the addresses of g, packed, t_accum, exponent and e_accum, its first group row, its
# row count, the address of its row ids (touched rows), the global index of its first row (a
# ZeRO block's or a row shard's offset, added to the row for the rounding hash only), the global
# row length and the global index of its first column (a tensor-parallel column shard: the hash
# places it in the whole row, and its row norm divides by the whole row); `row_mat` int32 the
# matrix of every group row. One launch thus covers all the
# group's matrices (a launch per matrix, with its torch glue, made the update host-bound).


TAB = tl.constexpr(11)   # int64 fields per matrix in the group table


@triton.jit
def _group_rows(tab_ptr, row_mat_ptr, gr, live):
    """For group rows gr: (table row pointer, matrix index, matrix-local row as int64)."""
    m = tl.load(row_mat_ptr + gr, mask=live, other=0).to(tl.int64)
    t = tab_ptr + m * TAB
    lr = gr.to(tl.int64) - tl.load(t + 5, mask=live, other=0)
    return t, m, lr


@triton.jit
def _ptr(t, field: tl.constexpr, live, ty: tl.constexpr):
    return tl.load(t + field, mask=live, other=0).to(tl.pointer_type(ty))


@triton.jit
def _evidence_rows(t, lr, live, COLS: tl.constexpr, G_TY: tl.constexpr):
    """Pointers to the evidence rows lr: G_TY is tl.float32, or tl.bfloat16 (widened exactly
    where loaded)."""
    return _ptr(t, 0, live, G_TY) + lr * COLS


@triton.jit
def _state_rows(t, lr, live, ROW_IDS: tl.constexpr):
    """The matrix rows that evidence rows lr update: lr itself, or (touched rows) the row ids the
    table's field 7 points to. State, trits and hash positions use these; evidence uses lr."""
    if ROW_IDS:
        return tl.load(_ptr(t, 7, live, tl.int64) + lr, mask=live, other=0)
    return lr


@triton.jit
def _packed_tile(t, lr, live, b, NB: tl.constexpr, S_P: tl.constexpr):
    bm = live[:, None] & (b[None, :] < NB)
    bp = _ptr(t, 1, live, tl.uint8) + lr * S_P
    byte = tl.load(bp[:, None] + b[None, :], mask=bm, other=121).to(tl.int32)
    # Bytes above 242 are not base-3 trits; packing's table decodes them as five zeros.
    return bp, bm, tl.where(byte > 242, 121, byte)


@triton.jit(do_not_specialize=["TOTAL", "ge_bits"])
def _row_sums_kernel(tab_ptr, row_mat_ptr, scale_tab_ptr, abs_sum_ptr, ge_ptr, TOTAL, ge_bits,
                     COLS: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_B: tl.constexpr, ABS: tl.constexpr, PRODUCT: tl.constexpr,
                     ROW_IDS: tl.constexpr, S_P: tl.constexpr, S_E: tl.constexpr,
                     G_TY: tl.constexpr):
    """Per group row: sum |g| (float64) and dL/dE = fp32(sum g * t) * scale * ln2 / k (fp32)."""
    gr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = gr < TOTAL
    t, m, lr = _group_rows(tab_ptr, row_mat_ptr, gr, live)
    sr = _state_rows(t, lr, live, ROW_IDS)
    gp = _evidence_rows(t, lr, live, COLS, G_TY)
    acc_abs = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float64)
    acc_gt = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float64)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bp, bm, rest = _packed_tile(t, sr, live, b, NB, S_P)
        for d in tl.static_range(5):
            col = b * 5 + d
            cm = bm & (col[None, :] < COLS)
            g = tl.load(gp[:, None] + col[None, :], mask=cm, other=0.0).to(tl.float32)
            if ABS:
                acc_abs += tl.abs(g).to(tl.float64)
            if PRODUCT:
                acc_gt += (g * (rest % 3 - 1).to(tl.float32)).to(tl.float64)
            rest = rest // 3
    if ABS:
        tl.store(abs_sum_ptr + gr, tl.sum(acc_abs, axis=1), mask=live)
    if PRODUCT:
        e = tl.load(_ptr(t, 3, live, tl.int8) + sr * S_E, mask=live, other=0).to(tl.int32)
        scale = tl.load(scale_tab_ptr + e + 128, mask=live, other=0.0)
        c = ge_bits.to(tl.int32).to(tl.float32, bitcast=True)
        tl.store(ge_ptr + gr, tl.sum(acc_gt, axis=1).to(tl.float32) * scale * c, mask=live)


@triton.jit
def _matrix_means_kernel(tab_ptr, abs_sum_ptr, ge_ptr, tensor_s_ptr, mean_ge_ptr,
                         COLS: tl.constexpr, BLOCK: tl.constexpr, TENSOR_NORM: tl.constexpr,
                         MEAN_GE: tl.constexpr):
    """Per matrix, in float64: mean |g| over the whole matrix ("tensor" norm) and mean |dL/dE|
    over its rows (scale_mode "norm"), each rounded once to fp32."""
    m = tl.program_id(0)
    base = tl.load(tab_ptr + m * TAB + 5)
    rows = tl.load(tab_ptr + m * TAB + 6)
    acc_a = tl.zeros((BLOCK,), dtype=tl.float64)
    acc_e = tl.zeros((BLOCK,), dtype=tl.float64)
    for r0 in range(0, rows, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        ok = r < rows
        if TENSOR_NORM:
            acc_a += tl.load(abs_sum_ptr + base + r, mask=ok, other=0.0)
        if MEAN_GE:
            acc_e += tl.abs(tl.load(ge_ptr + base + r, mask=ok, other=0.0)).to(tl.float64)
    if TENSOR_NORM:
        tl.store(tensor_s_ptr + m, (tl.sum(acc_a, axis=0) / (rows * COLS).to(tl.float64)).to(tl.float32))
    if MEAN_GE:
        tl.store(mean_ge_ptr + m, (tl.sum(acc_e, axis=0) / rows.to(tl.float64)).to(tl.float32))


@triton.jit
def _row_terms(t, m, lr, gr, live, abs_sum_ptr, tensor_s_ptr, COLS: tl.constexpr,
               ROW_NORM: tl.constexpr, ROW_IDS: tl.constexpr):
    """Per group row: the matrix row sr (lr: the evidence row), the row the hash sees (global,
    for a block), the global row length (COLS unless tp-split) and first column, and -d, where
    d = s + 1e-30 in fp32 as torch adds it, s the row's (or the matrix's) mean |g|."""
    sr = _state_rows(t, lr, live, ROW_IDS)
    hr = sr + tl.load(t + 8, mask=live, other=0)
    row_len = tl.load(t + 9, mask=live, other=COLS)
    col_off = tl.load(t + 10, mask=live, other=0)
    if ROW_NORM:
        s = (tl.load(abs_sum_ptr + gr, mask=live, other=1.0) / row_len.to(tl.float64)).to(tl.float32)
    else:
        s = tl.load(tensor_s_ptr + m, mask=live, other=1.0)
    return sr, hr, row_len, col_off, 0.0 - (s + tl.full((), 1e-30, tl.float32))


@triton.jit
def _vote(g, negd, hr, row_len, col, col_off, rate_bits, salt, STOCHASTIC: tl.constexpr,
          MAX_VOTE: tl.constexpr):
    """rule.quantize_evidence of fp32 evidence g [R, C] at columns col: x = -g / d * rate (rate:
    the int32 bits of the fp32 rate torch multiplies by), rounded at the entry's global hash
    position."""
    # (-g) / d == g / (-d) exactly under round-to-nearest, signed zeros included.
    x = tl.math.div_rn(g, negd[:, None]) * rate_bits.to(tl.int32).to(tl.float32, bitcast=True)
    pos = (hr.to(tl.uint32)[:, None] * row_len.to(tl.uint32)[:, None]
           + (col[None, :] + col_off[:, None]).to(tl.uint32))
    return _sround(x, pos, salt, STOCHASTIC, MAX_VOTE)


@triton.jit
def _scale_vote(ge_ptr, mean_ge_ptr, gr, m, live, hr, srate_bits, salt, NORM_SCALES: tl.constexpr,
                STOCHASTIC: tl.constexpr, MAX_VOTE: tl.constexpr):
    """rule.votes_from_scale_grad of the rows' dL/dE: its x, hashed at position = the matrix's row."""
    ge = tl.load(ge_ptr + gr, mask=live, other=0.0)
    srate32 = srate_bits.to(tl.int32).to(tl.float32, bitcast=True)
    if NORM_SCALES:
        mean = tl.load(mean_ge_ptr + m, mask=live, other=1.0)
        xe = tl.math.div_rn(ge, 0.0 - (mean + tl.full((), 1e-30, tl.float32))) * srate32
    else:
        xe = (0.0 - tl.where(ge > 0, 1.0, tl.where(ge < 0, -1.0, 0.0))) * srate32
    return _sround(xe, hr.to(tl.uint32), salt, STOCHASTIC, MAX_VOTE)


@triton.jit(do_not_specialize=["TOTAL", "rate_bits", "srate_bits", "salt_bits"])
def _group_update_kernel(tab_ptr, row_mat_ptr, abs_sum_ptr, tensor_s_ptr, ge_ptr, mean_ge_ptr,
                         stats_ptr, TOTAL, rate_bits, srate_bits, salt_bits,
                         COLS: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_B: tl.constexpr, STOCHASTIC: tl.constexpr, MAX_VOTE: tl.constexpr,
                         THRESHOLD: tl.constexpr, DECAY: tl.constexpr, FREEZE: tl.constexpr,
                         ROW_NORM: tl.constexpr, CAP: tl.constexpr, ACC_MAX: tl.constexpr,
                         SCALES: tl.constexpr, NORM_SCALES: tl.constexpr,
                         S_THRESHOLD: tl.constexpr, ROW_IDS: tl.constexpr,
                         S_P: tl.constexpr, S_T: tl.constexpr, S_E: tl.constexpr,
                         G_TY: tl.constexpr):
    pid_b = tl.program_id(1)
    gr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = gr < TOTAL
    t, m, lr = _group_rows(tab_ptr, row_mat_ptr, gr, live)
    sr, hr, row_len, col_off, negd = _row_terms(t, m, lr, gr, live, abs_sum_ptr, tensor_s_ptr,
                                                COLS, ROW_NORM, ROW_IDS)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bp, bm, rest = _packed_tile(t, sr, live, b, NB, S_P)
    gp = _evidence_rows(t, lr, live, COLS, G_TY)
    tp = _ptr(t, 2, live, tl.int8) + sr * S_T
    salt = salt_bits.to(tl.int32).to(tl.uint32, bitcast=True)   # int32 bits of the hash mix
    new_byte = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
    flips = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
    p3 = 1
    for d in tl.static_range(5):
        col = b * 5 + d
        cm = bm & (col[None, :] < COLS)
        trit = tl.where(cm, rest % 3 - 1, 0)   # padding digits repack as trit 0, as pack_trits does
        rest = rest // 3
        acc = tl.load(tp[:, None] + col[None, :], mask=cm, other=0).to(tl.int32)
        if FREEZE:
            acc = acc * 0
        else:
            if DECAY > 0:
                acc = acc - _trunc_div(acc, 1 << DECAY)
            g = tl.load(gp[:, None] + col[None, :], mask=cm, other=0.0).to(tl.float32)
            acc = acc + _vote(g, negd, hr, row_len, col, col_off, rate_bits, salt, STOCHASTIC,
                              MAX_VOTE)
        n = tl.where(cm, _trit_moves(acc, trit, THRESHOLD), 0)
        trit, acc = _settle(acc, trit, n, THRESHOLD, CAP, ACC_MAX)
        tl.store(tp[:, None] + col[None, :], acc.to(tl.int8), mask=cm)
        new_byte += (trit + 1) * p3
        flips += tl.abs(n)
        p3 = p3 * 3
    tl.store(bp[:, None] + b[None, :], new_byte.to(tl.uint8), mask=bm)
    tl.atomic_add(stats_ptr, tl.sum(tl.sum(flips, axis=1), axis=0))
    if SCALES:
        if pid_b == 0:
            ep = _ptr(t, 3, live, tl.int8) + sr * S_E
            eap = _ptr(t, 4, live, tl.int8) + sr * S_E
            e = tl.load(ep, mask=live, other=0).to(tl.int32)
            ea = tl.load(eap, mask=live, other=0).to(tl.int32)
            if DECAY > 0:
                ea = ea - _trunc_div(ea, 1 << DECAY)
            ea += _scale_vote(ge_ptr, mean_ge_ptr, gr, m, live, hr, srate_bits, salt, NORM_SCALES,
                              STOCHASTIC, MAX_VOTE)
            mv, ea = _scale_step(ea, e, live, S_THRESHOLD, ACC_MAX)
            tl.store(ep, (e + mv).to(tl.int8), mask=live)
            tl.store(eap, ea.to(tl.int8), mask=live)
            tl.atomic_add(stats_ptr + 1, tl.sum(tl.abs(mv), axis=0))


@triton.jit(do_not_specialize=["TOTAL", "rate_bits", "srate_bits", "salt_bits"])
def _group_votes_kernel(tab_ptr, row_mat_ptr, abs_sum_ptr, tensor_s_ptr, ge_ptr, mean_ge_ptr,
                        votes_ptr, e_votes_ptr, TOTAL, rate_bits, srate_bits, salt_bits,
                        COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        STOCHASTIC: tl.constexpr, MAX_VOTE: tl.constexpr, ROW_NORM: tl.constexpr,
                        SCALES: tl.constexpr, NORM_SCALES: tl.constexpr, ROW_IDS: tl.constexpr,
                        G_TY: tl.constexpr):
    """The votes `_group_update_kernel` adds to the accumulators, written out instead (int32,
    group row gr at votes_ptr + gr * COLS), for evidence committed per micro-batch."""
    pid_c = tl.program_id(1)
    gr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = gr < TOTAL
    t, m, lr = _group_rows(tab_ptr, row_mat_ptr, gr, live)
    _, hr, row_len, col_off, negd = _row_terms(t, m, lr, gr, live, abs_sum_ptr, tensor_s_ptr,
                                               COLS, ROW_NORM, ROW_IDS)
    salt = salt_bits.to(tl.int32).to(tl.uint32, bitcast=True)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = live[:, None] & (col[None, :] < COLS)
    gp = _evidence_rows(t, lr, live, COLS, G_TY)
    g = tl.load(gp[:, None] + col[None, :], mask=cm, other=0.0).to(tl.float32)
    q = _vote(g, negd, hr, row_len, col, col_off, rate_bits, salt, STOCHASTIC, MAX_VOTE)
    tl.store(votes_ptr + gr.to(tl.int64)[:, None] * COLS + col[None, :], q, mask=cm)
    if SCALES:
        if pid_c == 0:
            tl.store(e_votes_ptr + gr, _scale_vote(ge_ptr, mean_ge_ptr, gr, m, live, hr, srate_bits,
                                                   salt, NORM_SCALES, STOCHASTIC, MAX_VOTE),
                     mask=live)


# Packed bytes per program (5 weights each) and the widest tile, in bytes along a row. One row
# of 256 bytes per program beat 16 x 64 by 1.8x at 7168 x 7168 on an H100 (bench/RESULTS.md):
# the digit planes read g at a stride of 5, and fewer rows in flight keep the lines in L1.
TILE_BYTES, TILE_MAX_B = 256, 256


def _tiles(rows: int, nb: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_B): about TILE_BYTES packed bytes per program."""
    block_b = min(TILE_MAX_B, triton.next_power_of_2(nb))
    block_r = max(1, min(TILE_BYTES // block_b, triton.next_power_of_2(rows)))
    return block_r, block_b


@dataclass(frozen=True)
class DenseItem:
    """One matrix's state (updated in place) and its fp32 or bf16 evidence: [rows, cols] for the
    whole matrix, or [n, cols] for the distinct rows `row_ids` (int64 [n]; touched rows only:
    the rest of the matrix is neither read nor written, as TernaryMatrix's sparse path).

    A block of a larger matrix (a ZeRO row block, arbd/ternary/zero.py) passes the block's state
    views with `row_offset`, the global index of its first row, which the rounding hash adds,
    and `mean_ge`, the fp32 mean |dL/dE| over all the matrix's rows (scale_mode "norm"), since
    the block alone cannot compute it.

    A tensor-parallel column shard holds columns [col_offset, col_offset + cols) of rows of
    `row_len` columns: the hash places its entries in the whole row, and since its row sums are
    partial, the caller passes them completed over the tp group: `row_abs_sums` (float64 sum |g|
    per row, divided by row_len for the row norm) and `ge` (fp32 dL/dE per row). A group either
    gives both (as its evidence needs them) or neither."""
    packed: torch.Tensor
    t_accum: torch.Tensor
    exponent: torch.Tensor
    e_accum: torch.Tensor
    grad: torch.Tensor
    row_ids: torch.Tensor | None = None
    row_offset: int = 0
    mean_ge: torch.Tensor | None = None
    col_offset: int = 0
    row_len: int | None = None
    row_abs_sums: torch.Tensor | None = None
    ge: torch.Tensor | None = None


def supports(packed: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the fused dense update can take this evidence (else the torch rule must)."""
    return (grad.dtype in (torch.float32, torch.bfloat16) and grad.dim() == 2
            and grad.device == packed.device)


def _check(it: DenseItem, votes: bool = False) -> None:
    """`votes`: for votes_many, which never touches the accumulators; they may then be a ZeRO
    block of the matrix (rows from the packed trits)."""
    rows, cols = (it.packed.shape[0], it.grad.shape[1]) if votes else it.t_accum.shape
    if not supports(it.packed, it.grad):
        raise ValueError(f"dense_update takes 2-d float32 or bfloat16 evidence on {it.packed.device}, "
                         f"got {it.grad.dtype} {tuple(it.grad.shape)} on {it.grad.device}")
    n = rows if it.row_ids is None else it.row_ids.shape[0]
    if tuple(it.grad.shape) != (n, cols) or it.packed.shape != (rows, packing.packed_cols(cols)):
        raise ValueError(f"shapes do not match: grad {tuple(it.grad.shape)}, t_accum {(rows, cols)}, "
                         f"packed {tuple(it.packed.shape)}"
                         + ("" if it.row_ids is None else f", {n} row ids"))
    if it.row_ids is not None and (it.row_ids.dtype != torch.int64 or it.row_ids.dim() != 1
                                   or it.row_ids.device != it.packed.device):
        raise ValueError("row_ids must be a 1-d int64 tensor on the state's device")
    if it.row_offset < 0 or (it.row_offset and it.row_ids is not None):
        raise ValueError(f"row_offset {it.row_offset}: a block's offset is >= 0, and touched rows "
                         "(row_ids) carry their own global ids")
    if it.row_len is not None and it.row_len < it.col_offset + cols:
        raise ValueError(f"columns [{it.col_offset}, {it.col_offset + cols}) do not fit rows of "
                         f"{it.row_len}")
    for name, dtype in (("row_abs_sums", torch.float64), ("ge", torch.float32)):
        v = getattr(it, name)
        if v is not None and (tuple(v.shape) != (n,) or v.dtype != dtype or v.device != it.packed.device):
            raise ValueError(f"{name} must be {dtype} [{n}] on the state's device")
    if it.mean_ge is not None and (it.mean_ge.numel() != 1 or it.mean_ge.dtype != torch.float32
                                   or it.mean_ge.device != it.packed.device):
        raise ValueError("mean_ge must be one float32 value on the state's device")
    for name in ("grad",) + (("row_ids",) if it.row_ids is not None else ()):
        if not getattr(it, name).is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    cuda_rows.check_row_layout(it.packed, it.t_accum, it.exponent, it.e_accum)
    if it.exponent.stride(0) != it.e_accum.stride(0):
        raise ValueError("exponent and e_accum must share a row stride")


def row_strides(it: DenseItem) -> tuple[int, int, int]:
    """(packed, t_accum, exponent / e_accum) row strides: (nb, cols, 1) for contiguous buffers,
    the record width three times for state.row_records views. A group shares them (constexpr)."""
    return it.packed.stride(0), it.t_accum.stride(0), it.exponent.stride(0)


@functools.lru_cache(maxsize=64)
def _row_matrix_map(device: torch.device, rows: tuple[int, ...]) -> torch.Tensor:
    """int32 [sum(rows)]: the matrix index of every group row (the same each step)."""
    n = torch.arange(len(rows), dtype=torch.int32)
    return torch.repeat_interleave(n, torch.tensor(rows)).to(device)


def _table(items: list[DenseItem], device: torch.device) -> torch.Tensor:
    rows, base = [], 0
    for it in items:
        r = it.grad.shape[0]   # evidence rows: the matrix's, or its touched rows
        rows.append([it.grad.data_ptr(), it.packed.data_ptr(), it.t_accum.data_ptr(),
                     it.exponent.data_ptr(), it.e_accum.data_ptr(), base, r,
                     0 if it.row_ids is None else it.row_ids.data_ptr(), it.row_offset,
                     it.grad.shape[1] if it.row_len is None else it.row_len, it.col_offset])
        base += r
    tab = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":   # pinned + async: no wait for the work already queued
        return tab.pin_memory().to(device, non_blocking=True)
    return tab


def _group_index(items: list[DenseItem], dev: torch.device, rows: tuple[int, ...],
                 row_ids: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's table and the matrix of every group row. Whole matrices: the same map every
    step (cached). Touched rows change every step: the map is built on the device (a host-built
    one is a pageable copy, which waits for the queued work)."""
    row_mat = _row_matrix_map(dev, rows) if not row_ids else torch.cat(
        [torch.full((r,), i, dtype=torch.int32, device=dev) for i, r in enumerate(rows)])
    return _table(items, dev), row_mat


def _row_sums(tab: torch.Tensor, row_mat: torch.Tensor, dev: torch.device, total: int, cols: int,
              abs_sum: torch.Tensor, ge: torch.Tensor, *, need_abs: bool, product: bool,
              row_ids: bool, strides: tuple[int, int, int], g_dtype: torch.dtype,
              num_warps: int = 4) -> None:
    """Launch `_row_sums_kernel` over a group's `total` rows: sum |g| into abs_sum (need_abs),
    dL/dE into ge (product)."""
    nb = packing.packed_cols(cols)
    br, bb = _tiles(total, nb)
    _row_sums_kernel[(triton.cdiv(total, br),)](
        tab, row_mat, packing.exponent_to_scale_table(dev), abs_sum, ge, total,
        _f32_bits(math.log(2) / SCALE_K), COLS=cols, NB=nb, BLOCK_R=br, BLOCK_B=bb,
        ABS=need_abs, PRODUCT=product, ROW_IDS=row_ids, S_P=strides[0], S_E=strides[2],
        G_TY=tl.bfloat16 if g_dtype == torch.bfloat16 else tl.float32, num_warps=num_warps)


def _mark_written(*tensors: torch.Tensor) -> None:
    """Bump the version counters of buffers a kernel wrote through raw pointers, as an in-place
    torch op would: whatever keys on them (TernaryMatrix.decoded_shared) sees the change."""
    for t in tensors:   # one at a time: older torch takes a single tensor only
        torch.autograd.graph.increment_version(t)


@dataclass
class _Prepared:
    """A group's table, row sums and per-matrix means: what the update and the votes kernels read."""
    cols: int
    nb: int
    rows: tuple[int, ...]
    total: int
    dev: torch.device
    tab: torch.Tensor | None
    row_mat: torch.Tensor | None
    abs_sum: torch.Tensor | None
    ge: torch.Tensor | None
    per_mat: torch.Tensor | None   # [2, n]: tensor-wide s, mean |dL/dE|
    freeze: bool
    row_norm: bool
    row_ids: bool
    strides: tuple[int, int, int]
    g_ty: object


def _prepare(items: list[DenseItem], rule: TernaryRule, *, votes: bool = False,
             num_warps: int = 4) -> _Prepared:
    """Check a group, build its table and launch the row-sum and matrix-mean kernels the rule
    needs. `votes`: for votes only (quantize_evidence always normalises, even rows the update
    would freeze)."""
    if not items:
        raise ValueError("dense_update_many needs at least one matrix")
    for it in items:
        _check(it, votes)
    cols = items[0].grad.shape[1]
    if any(it.grad.shape[1] != cols for it in items):
        raise ValueError("dense_update_many takes matrices of one column count; group them first")
    dev = items[0].packed.device
    if any(it.packed.device != dev for it in items):
        raise ValueError("dense_update_many takes matrices on one device")
    row_ids = items[0].row_ids is not None
    if any((it.row_ids is not None) != row_ids for it in items):
        raise ValueError("dense_update_many takes whole matrices or touched rows, not both at once")
    given_means = items[0].mean_ge is not None
    if any((it.mean_ge is not None) != given_means for it in items):
        raise ValueError("dense_update_many takes mean_ge for every matrix or for none")
    given_sums = items[0].row_abs_sums is not None or items[0].ge is not None
    if any((it.row_abs_sums is not None or it.ge is not None) != given_sums for it in items):
        raise ValueError("dense_update_many takes row sums (row_abs_sums, ge) for every matrix "
                         "or for none")
    strides = row_strides(items[0])
    if any(row_strides(it) != strides for it in items):
        raise ValueError("dense_update_many takes matrices of one state layout (row strides); "
                         "group them first")
    g_dtype = items[0].grad.dtype
    if any(it.grad.dtype != g_dtype for it in items):
        raise ValueError("dense_update_many takes evidence of one dtype; group them first")
    g_ty = tl.bfloat16 if g_dtype == torch.bfloat16 else tl.float32
    rows = tuple(it.grad.shape[0] for it in items)
    total = sum(rows)
    freeze = bool(not votes and rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM)
    row_norm = rule.norm == "row" and cols >= MIN_ROW_FOR_ROW_NORM
    prep = _Prepared(cols, packing.packed_cols(cols), rows, total, dev, None, None, None, None,
                     None, freeze, row_norm, row_ids, strides, g_ty)
    if total == 0:
        return prep
    prep.tab, prep.row_mat = _group_index(items, dev, rows, row_ids)
    scales = rule.learn_scales
    norm_scales = scales and rule.scale_mode == "norm"
    need_abs = not freeze
    prep.abs_sum = abs_sum = torch.empty(total if need_abs else 1, dtype=torch.float64, device=dev)
    prep.ge = ge = torch.empty(total if scales else 1, dtype=torch.float32, device=dev)
    prep.per_mat = per_mat = torch.empty(2, len(items), dtype=torch.float32, device=dev)
    if given_sums:   # completed over a tp group by the caller
        for name, need, buf in (("row_abs_sums", need_abs, abs_sum), ("ge", scales, ge)):
            if need:
                parts = [getattr(it, name) for it in items]
                if any(p is None for p in parts):
                    raise ValueError(f"this rule needs {name} of every matrix")
                torch.cat(parts, out=buf)
    elif need_abs or scales:
        _row_sums(prep.tab, prep.row_mat, dev, total, cols, abs_sum, ge, need_abs=need_abs,
                  product=scales, row_ids=row_ids, strides=strides, g_dtype=g_dtype,
                  num_warps=num_warps)
    tensor_norm = need_abs and not row_norm
    if tensor_norm and (given_means or given_sums):
        raise ValueError("blocks and column shards of a matrix (mean_ge or row sums given) need "
                         "per-row evidence normalisation: a tensor-wide norm needs all evidence")
    mean_here = norm_scales and not given_means
    if tensor_norm or mean_here:
        _matrix_means_kernel[(len(items),)](prep.tab, abs_sum, ge, per_mat[0], per_mat[1], COLS=cols,
                                            BLOCK=1024, TENSOR_NORM=tensor_norm,
                                            MEAN_GE=mean_here, num_warps=4)
    if norm_scales and given_means:
        torch.stack([it.mean_ge.reshape(()) for it in items], out=per_mat[1])
    return prep


def dense_update_many(items: list[DenseItem], rule: TernaryRule, *,
                      num_warps: int = 4) -> torch.Tensor:
    """quantize_evidence + scale_votes + apply_votes of whole matrices of one column count, in
    place, bit for bit as TernaryMatrix's torch path, in three launches for all of them (two
    without a per-matrix mean). Items with `row_ids` (all or none) update only those rows, as the
    torch path does for sparse row evidence (global row ids hash the rounding; the "norm" scale
    mean is over the rows given). Returns (trit flips, scale moves) as int32 [2] on the device."""
    p = _prepare(items, rule, num_warps=num_warps)
    stats = torch.zeros(2, dtype=torch.int32, device=p.dev)
    if p.total == 0:
        return stats
    scales = rule.learn_scales
    br, bb = _tiles(p.total, p.nb)
    s_p, s_t, s_e = p.strides
    _group_update_kernel[(triton.cdiv(p.total, br), triton.cdiv(p.nb, bb))](
        p.tab, p.row_mat, p.abs_sum, p.per_mat[0], p.ge, p.per_mat[1], stats, p.total,
        _f32_bits(rule.evidence_rate), _f32_bits(rule.scale_rate), _salt_bits(rule.salt),
        COLS=p.cols, NB=p.nb, BLOCK_R=br, BLOCK_B=bb, STOCHASTIC=rule.rounding == "stochastic",
        MAX_VOTE=rule.max_vote, THRESHOLD=rule.threshold, DECAY=rule.decay_shift, FREEZE=p.freeze,
        ROW_NORM=p.row_norm, CAP=rule.saturated_cap, ACC_MAX=ACC_MAX, SCALES=scales,
        NORM_SCALES=scales and rule.scale_mode == "norm", S_THRESHOLD=rule.scale_threshold,
        ROW_IDS=p.row_ids, S_P=s_p, S_T=s_t, S_E=s_e, G_TY=p.g_ty, num_warps=num_warps,
        enable_fp_fusion=False)
    for it in items:
        _mark_written(it.packed, it.t_accum, it.exponent, it.e_accum)
    return stats


def votes_many(items: list[DenseItem], rule: TernaryRule, *,
               num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TernaryMatrix.quantize of every item's evidence (no tensor-parallel shards), bit for bit:
    int32 votes [total, cols] and scale votes [total] for the group's rows one after another (item
    i's rows are the i-th block of `rows` evidence rows), and per evidence row whether sum |g| is
    finite (bool [total]; a non-finite row's votes are not meaningful). The state is only read.
    What `commit_micro_batch` does per matrix in ~20 torch ops and a host read, for a whole
    group in three launches."""
    p = _prepare(items, rule, votes=True, num_warps=num_warps)
    votes = torch.empty(p.total, p.cols, dtype=torch.int32, device=p.dev)
    e_votes = torch.zeros(p.total, dtype=torch.int32, device=p.dev)
    if p.total == 0:
        return votes, e_votes, torch.ones(0, dtype=torch.bool, device=p.dev)
    scales = rule.learn_scales
    bc = min(256, triton.next_power_of_2(p.cols))
    br = max(1, min(2048 // bc, triton.next_power_of_2(p.total)))
    _group_votes_kernel[(triton.cdiv(p.total, br), triton.cdiv(p.cols, bc))](
        p.tab, p.row_mat, p.abs_sum, p.per_mat[0], p.ge, p.per_mat[1], votes, e_votes, p.total,
        _f32_bits(rule.evidence_rate), _f32_bits(rule.scale_rate), _salt_bits(rule.salt),
        COLS=p.cols, BLOCK_R=br, BLOCK_C=bc, STOCHASTIC=rule.rounding == "stochastic",
        MAX_VOTE=rule.max_vote, ROW_NORM=p.row_norm, SCALES=scales,
        NORM_SCALES=scales and rule.scale_mode == "norm", ROW_IDS=p.row_ids, G_TY=p.g_ty,
        num_warps=num_warps, enable_fp_fusion=False)
    return votes, e_votes, torch.isfinite(p.abs_sum)


def row_scale_grads(items: list[DenseItem]) -> list[torch.Tensor]:
    """dL/dE of every row of each item (fp32 [rows]), as rule.scale_grad computes it, from
    `_row_sums_kernel`: one launch per group of one column count, evidence dtype and layout
    instead of a few torch ops per matrix. A ZeRO block needs these before its update, to
    agree on the mean |dL/dE| over all ranks' rows (zero.py)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        _check(it)
        key = (it.t_accum.shape[1], it.grad.dtype, it.row_ids is None, row_strides(it))
        groups.setdefault(key, []).append(i)
    for (cols, g_dtype, whole, strides), idx in groups.items():
        group = [items[i] for i in idx]
        dev = group[0].packed.device
        rows = tuple(it.grad.shape[0] for it in group)
        total = sum(rows)
        ge = torch.empty(max(total, 1), dtype=torch.float32, device=dev)
        if total:
            tab, row_mat = _group_index(group, dev, rows, not whole)
            _row_sums(tab, row_mat, dev, total, cols, ge, ge, need_abs=False, product=True,
                      row_ids=not whole, strides=strides, g_dtype=g_dtype)
        for i, part in zip(idx, ge[:total].split(rows)):
            out[i] = part
    return out


def dense_update(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                 e_accum: torch.Tensor, grad: torch.Tensor, rule: TernaryRule, *,
                 num_warps: int = 4) -> torch.Tensor:
    """dense_update_many of one matrix; returns its int32 [2] (trit flips, scale moves)."""
    return dense_update_many([DenseItem(packed, t_accum, exponent, e_accum, grad)], rule,
                             num_warps=num_warps)


@functools.lru_cache(maxsize=64)
def _salt_bits(salt: int) -> int:
    """rule._salt_mix as a signed int32 (every matrix of a step shares the salt)."""
    v = _salt_mix(salt)
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.lru_cache(maxsize=256)
def _f32_bits(v: float) -> int:
    """The bits of the fp32 torch turns a Python scalar into, as a signed int32."""
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32)[0])


# ---------------------------------------------------------------------------------------------
# Touched-row update: rule.apply_votes on rows idx of a TernaryMatrix, in one pass.
#
# A program walks blocks of BLOCK_R touched rows. Votes and trit accumulators stay in their
# [rows, cols] layout, so they move as contiguous vectors (walking each byte's five digits, as
# _dense_update_kernel does, made every access a strided scalar one and ran 3x slower:
# bench/RESULTS.md, "Touched-row update, round 2"). Column c's trit is digit c % 5 of byte c // 5,
# taken by a multiply-shift. Two ways to move between bytes and columns:
# - "gather" (rows of 8+ packed bytes, the fastest measured): the row's bytes load once and
#   tl.gather spreads them to columns; packing gathers the new trits into [byte, digit] slots and
#   sums each byte's five. Triton 3.6 cannot compile this for rows of under 8 bytes (its
#   OptimizeThreadLocality pass asserts on the small gathers).
# - "scan" (the narrow rows): each column loads its own byte (a row's bytes share one or two
#   sectors, so the repeats hit L1); packing is a segmented prefix sum of digit * 3**(c % 5) over
#   each byte's five columns, stored by the byte's last column. No gather, so every width compiles;
#   its per-column byte loads and stores make it slower on wide rows.
# Integer arithmetic only, so the result is bit-identical to the torch rule. Divisions act on
# magnitudes (trunc toward zero, as torch's rounding_mode="trunc"), which keeps the interpreter
# (NumPy floor division) and the GPU (C truncation) in agreement.


@triton.jit
def _pow3(d):
    return tl.where(d == 0, 1, tl.where(d == 1, 3, tl.where(d == 2, 9, tl.where(d == 3, 27, 81))))


@triton.jit
def _segment_sum(a, head_a, b, head_b):
    # prefix sums that restart where head is set (the first column of each packed byte)
    return tl.where(head_b != 0, b, a + b), head_a | head_b


@triton.jit
def _row_chunk(packed_ptr, t_acc_ptr, votes_ptr, row, r, live, c0, COLS: tl.constexpr,
               NB: tl.constexpr, PAD: tl.constexpr, CW: tl.constexpr, CP: tl.constexpr,
               NBC: tl.constexpr, NBC_P: tl.constexpr, BLOCK_R: tl.constexpr,
               THRESHOLD: tl.constexpr, DECAY: tl.constexpr, FREEZE: tl.constexpr,
               CAP: tl.constexpr, ACC_MAX: tl.constexpr, GATHER: tl.constexpr,
               EVICT: tl.constexpr, S_P: tl.constexpr, S_T: tl.constexpr):
    """The trit half of rule.apply_votes on columns [c0, c0 + CW) of the rows (c0 a multiple of
    5, so the chunk starts on a byte: NBC bytes, CP and NBC_P the powers of two holding CW and
    NBC); returns each row's trit flips."""
    # Per-column constants (loop-invariant: the compiler hoists them).
    lc = tl.arange(0, CP)
    col = c0 + lc
    cin = (lc < CW) & (col < COLS)
    byte_of = lc // 5                        # the byte within the chunk
    digit = lc % 5
    p3 = _pow3(digit)
    magic = (65535 + p3) // p3               # (x * magic) >> 16 == x // 3**d for x < 256
    head = (digit == 0).to(tl.int32)
    last = cin & ((digit == 4) | (col == COLS - 1))
    # digits past the last column pack as 1 (trit 0), as pack_trits pads
    pad = tl.where(col == COLS - 1, PAD, 0)
    if CW == CP and CW == COLS:
        # a mask constant along the row lets the loads and stores be 16-byte vectors
        cm = live[:, None]
    else:
        cm = live[:, None] & cin[None, :]
    b = tl.arange(0, NBC_P)
    bm = live[:, None] & ((b < NBC) & (c0 // 5 + b < NB))[None, :]
    pp = packed_ptr + row[:, None] * S_P + c0 // 5
    if GATHER:
        by = tl.load(pp + b[None, :], mask=bm, other=121)
        by = tl.gather(by, tl.broadcast_to(tl.minimum(byte_of, NBC_P - 1)[None, :],
                                           (BLOCK_R, CP)), 1)
    else:
        by = tl.load(pp + byte_of[None, :], mask=cm, other=121)
    by = by.to(tl.int32)
    # Bytes above 242 are not base-3 trits; packing's table decodes them as five zeros.
    by = tl.where(by > 242, 121, by)
    trit = ((by * magic[None, :]) >> 16) % 3 - 1
    off = row[:, None] * S_T + col[None, :]
    if FREEZE:
        acc = trit * 0                      # the rule zeroes frozen rows' accumulators
    else:
        acc = tl.load(t_acc_ptr + off, mask=cm, other=0).to(tl.int32)
        if DECAY > 0:
            acc = acc - _trunc_div(acc, 1 << DECAY)
        acc += tl.load(votes_ptr + r[:, None] * COLS + col[None, :], mask=cm, other=0,
                       eviction_policy=EVICT).to(tl.int32)
    # Masked-off elements read acc 0, vote 0 and byte 121 (trit 0), so they move nothing.
    n = _trit_moves(acc, trit, THRESHOLD)
    trit, acc = _settle(acc, trit, n, THRESHOLD, CAP, ACC_MAX)
    tl.store(t_acc_ptr + off, acc.to(tl.int8), mask=cm)
    if GATHER:
        # slot (b, d) takes column 5b + d of the chunk; slots past its columns hold digit 1
        d = tl.arange(0, 8)
        slot = b[:, None] * 5 + d[None, :]                                   # [NBC_P, 8]
        src = tl.reshape(tl.minimum(slot, CP - 1), (NBC_P * 8,))
        t_slot = tl.reshape(tl.gather(trit, tl.broadcast_to(src[None, :], (BLOCK_R, NBC_P * 8)),
                                      1), (BLOCK_R, NBC_P, 8))
        real = (slot < CW) & (c0 + slot < COLS)
        dig = tl.where(real[None, :, :], t_slot + 1, 1)
        packed = tl.sum(tl.where(d[None, None, :] < 5, dig * _pow3(d)[None, None, :], 0), axis=2)
        tl.store(pp + b[None, :], packed.to(tl.uint8), mask=bm)
    else:
        packed, _ = tl.associative_scan(
            ((trit + 1) * p3[None, :], tl.broadcast_to(head[None, :], (BLOCK_R, CP))), 1,
            _segment_sum)
        if PAD:
            packed += pad[None, :]
        tl.store(pp + byte_of[None, :], packed.to(tl.uint8), mask=live[:, None] & last[None, :])
    return tl.sum(tl.abs(n), axis=1)


@triton.jit
def _row_block(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr, ev_ptr, u, blk,
               COLS: tl.constexpr, NB: tl.constexpr, PAD: tl.constexpr, CW: tl.constexpr,
               CP: tl.constexpr, NBC: tl.constexpr, NBC_P: tl.constexpr, BLOCK_R: tl.constexpr,
               THRESHOLD: tl.constexpr, DECAY: tl.constexpr, FREEZE: tl.constexpr,
               CAP: tl.constexpr, ACC_MAX: tl.constexpr, SCALES: tl.constexpr,
               S_THRESHOLD: tl.constexpr, GATHER: tl.constexpr, EVICT: tl.constexpr,
               S_P: tl.constexpr, S_T: tl.constexpr, S_E: tl.constexpr, S_EA: tl.constexpr):
    """rule.apply_votes on touched rows [blk * BLOCK_R, (blk + 1) * BLOCK_R); returns the
    rows' trit flips and scale moves. S_*: row strides of packed, t_acc, exponent, e_acc
    (contiguous buffers or one row record: cuda_rows.check_row_layout). GATHER: the "gather"
    packing of the comment above, else "scan". A row wider than one chunk of CW columns is
    walked chunk by chunk in a loop the compiler keeps rolled (row_chunking)."""
    r = tl.arange(0, BLOCK_R).to(tl.int64) + blk * BLOCK_R      # u < 2**31: no overflow
    live = r < u
    row = tl.load(idx_ptr + r, mask=live, other=0, eviction_policy=EVICT).to(tl.int64)
    if SCALES:
        e = tl.load(exp_ptr + row * S_E, mask=live, other=0).to(tl.int32)
        ea = tl.load(e_acc_ptr + row * S_EA, mask=live, other=0).to(tl.int32)
        ev = tl.load(ev_ptr + r, mask=live, other=0, eviction_policy=EVICT).to(tl.int32)
    if CW >= COLS:
        flips = _row_chunk(packed_ptr, t_acc_ptr, votes_ptr, row, r, live, 0, COLS, NB, PAD, CW,
                           CP, NBC, NBC_P, BLOCK_R, THRESHOLD, DECAY, FREEZE, CAP, ACC_MAX,
                           GATHER, EVICT, S_P, S_T)
    else:
        flips = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for c0 in range(0, COLS, CW):
            flips += _row_chunk(packed_ptr, t_acc_ptr, votes_ptr, row, r, live, c0, COLS, NB,
                                PAD, CW, CP, NBC, NBC_P, BLOCK_R, THRESHOLD, DECAY, FREEZE, CAP,
                                ACC_MAX, GATHER, EVICT, S_P, S_T)
    if SCALES:
        if DECAY > 0:
            ea = ea - _trunc_div(ea, 1 << DECAY)
        ea += ev
        m, ea = _scale_step(ea, e, live, S_THRESHOLD, ACC_MAX)
        tl.store(exp_ptr + row * S_E, (e + m).to(tl.int8), mask=live)
        tl.store(e_acc_ptr + row * S_EA, ea.to(tl.int8), mask=live)
        moves = tl.abs(m)
    else:
        moves = flips * 0
    return flips, moves


@triton.jit(do_not_specialize=["u"])
def _apply_votes_kernel(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr, ev_ptr,
                        stats_ptr, u, COLS: tl.constexpr, NB: tl.constexpr, PAD: tl.constexpr,
                        CW: tl.constexpr, CP: tl.constexpr, NBC: tl.constexpr,
                        NBC_P: tl.constexpr, BLOCK_R: tl.constexpr,
                        THRESHOLD: tl.constexpr, DECAY: tl.constexpr, FREEZE: tl.constexpr,
                        CAP: tl.constexpr, ACC_MAX: tl.constexpr, SCALES: tl.constexpr,
                        S_THRESHOLD: tl.constexpr, GATHER: tl.constexpr, EVICT: tl.constexpr,
                        LOOP: tl.constexpr, S_P: tl.constexpr, S_T: tl.constexpr,
                        S_E: tl.constexpr, S_EA: tl.constexpr):
    # LOOP: a grid of a few programs per SM walks all blocks (one atomic per program); else one
    # block per program (a loop there would only hold registers: 124 against 64 at 16 x 64).
    if LOOP:
        flips = tl.zeros((BLOCK_R,), dtype=tl.int32)
        moves = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for blk in tl.range(tl.program_id(0), tl.cdiv(u, BLOCK_R), tl.num_programs(0)):
            f, m = _row_block(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr,
                              ev_ptr, u, blk, COLS, NB, PAD, CW, CP, NBC, NBC_P, BLOCK_R,
                              THRESHOLD, DECAY, FREEZE, CAP, ACC_MAX, SCALES, S_THRESHOLD,
                              GATHER, EVICT, S_P, S_T, S_E, S_EA)
            flips += f
            moves += m
    else:
        flips, moves = _row_block(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr,
                                  ev_ptr, u, tl.program_id(0), COLS, NB, PAD, CW, CP, NBC, NBC_P,
                                  BLOCK_R, THRESHOLD, DECAY, FREEZE, CAP, ACC_MAX, SCALES,
                                  S_THRESHOLD, GATHER, EVICT, S_P, S_T, S_E, S_EA)
    tl.atomic_add(stats_ptr, tl.sum(flips, axis=0))
    if SCALES:
        tl.atomic_add(stats_ptr + 1, tl.sum(moves, axis=0))


# Rows wider than this many trits are walked in chunks of ROW_CHUNK (25 bytes, padded to 128
# lanes): the kernel holds BLOCK_R x (row width) values in registers, and whole rows of 1,024+
# trits (votes mode sends every matrix here) took minutes to compile and spilled.
ROW_CHUNK_ABOVE = 128
ROW_CHUNK = 125


def row_chunking(cols: int) -> tuple[int, int, int, int]:
    """(columns per chunk, its power-of-two width, bytes per chunk, its power of two) for rows
    of `cols` trits: the whole row when it fits ROW_CHUNK_ABOVE, else ROW_CHUNK columns."""
    if cols <= ROW_CHUNK_ABOVE:
        nb = packing.packed_cols(cols)
        return cols, triton.next_power_of_2(cols), nb, triton.next_power_of_2(nb)
    return ROW_CHUNK, triton.next_power_of_2(ROW_CHUNK), ROW_CHUNK // 5, \
        triton.next_power_of_2(ROW_CHUNK // 5)


# (rows per block, warps per program, programs per SM or None for one block per program) of the
# two packings; the tuning runs are in bench/RESULTS.md ("Touched-row update, round 2").
ROW_CONFIG = {"gather": (16, 4, None), "scan": (32, 8, 4)}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4             # the interpreter: a few programs, so the block loop is exercised
    return _cuda_sm_count(device)


def row_packing(cols: int) -> str:
    """The packing apply_votes_rows uses for rows of `cols` trits (see the comment above)."""
    return "gather" if triton.next_power_of_2(packing.packed_cols(cols)) >= 8 else "scan"


_DEFAULT = object()


def apply_votes_rows(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                     e_accum: torch.Tensor, idx: torch.Tensor, votes: torch.Tensor,
                     e_votes: torch.Tensor | None, rule: TernaryRule, *,
                     packing_mode: str | None = None, block_r: int | None = None,
                     num_warps: int | None = None, programs_per_sm=_DEFAULT,
                     evict_first: bool = True) -> torch.Tensor:
    """rule.apply_votes on the distinct rows idx, in place on the matrix buffers (packed uint8
    [R, nb], t_accum int8 [R, cols], exponent / e_accum int8 [R]); votes [U, cols] and e_votes
    [U] (or None) of int8, int16 or int32 (other integer types are cast to int32 first, as the
    rule does). Returns int32 [2] (trit flips, scale moves) on the device, so nothing waits for
    the host. idx must be distinct (TernaryMatrix.votes() merges duplicates).
    packing_mode "gather" / "scan" (default: row_packing(cols)); block_r, num_warps and
    programs_per_sm (None: one program per block) default to ROW_CONFIG of that packing.
    packing_mode "cuda" runs the CUDA kernel (cuda_rows.py), which by default (packing_mode
    None) takes updates of up to cuda_rows.AUTO_MAX_ROWS rows of at most 64 trits on a CUDA
    device, and updates of any size of 64-trit row records (ARBD_CUDA_ROWS)."""
    cols, nb = t_accum.shape[1], packed.shape[1]
    record = cuda_rows.record_base(packed, t_accum, exponent, e_accum) is not None
    if packing_mode == "cuda" or (packing_mode is None
                                  and cuda_rows.usable(packed, cols, idx.numel(), record)):
        stats = cuda_rows.apply_votes_rows(packed, t_accum, exponent, e_accum, idx, votes, e_votes, rule)
        _mark_written(packed, t_accum, exponent, e_accum)  # caches keyed on versions see the change
        return stats
    cuda_rows.check_row_layout(packed, t_accum, exponent, e_accum)
    stats = torch.zeros(2, dtype=torch.int32, device=packed.device)
    u = idx.numel()
    if u == 0:
        return stats
    mode = packing_mode or row_packing(cols)
    br, nw, pps = ROW_CONFIG[mode]
    br, nw = block_r or br, num_warps or nw
    pps = pps if programs_per_sm is _DEFAULT else programs_per_sm

    def narrow(t: torch.Tensor) -> torch.Tensor:
        return (t if t.dtype in (torch.int8, torch.int16, torch.int32)
                else t.to(torch.int32)).contiguous()

    scales = bool(rule.learn_scales and e_votes is not None)
    blocks = triton.cdiv(u, br)
    grid = blocks if pps is None else min(blocks, pps * _sm_count(packed.device))
    tail = cols % 5
    cw, cp, nbc, nbc_p = row_chunking(cols)
    _apply_votes_kernel[(grid,)](
        packed, t_accum, exponent, e_accum, idx.reshape(-1).contiguous(), narrow(votes),
        narrow(e_votes) if scales else stats, stats, u, COLS=cols, NB=nb,
        PAD=(3 ** 5 - 3 ** tail) // 2 if tail else 0, CW=cw, CP=cp, NBC=nbc, NBC_P=nbc_p,
        BLOCK_R=br, THRESHOLD=rule.threshold,
        DECAY=rule.decay_shift, FREEZE=bool(rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM),
        CAP=rule.saturated_cap, ACC_MAX=ACC_MAX, SCALES=scales, S_THRESHOLD=rule.scale_threshold,
        GATHER=mode == "gather", EVICT="evict_first" if evict_first else "", LOOP=pps is not None,
        S_P=packed.stride(0), S_T=t_accum.stride(0), S_E=exponent.stride(0),
        S_EA=e_accum.stride(0), num_warps=nw)
    _mark_written(packed, t_accum, exponent, e_accum)
    return stats
