"""GPU kernels for the ternary update (issue 10): the fused dense update of a whole matrix, and the
touched-row update of sparse (codebook) rows at the end of the file.

Dense: float evidence in, new state out.

`dense_update` does what TernaryMatrix.apply_update does for dense float32 evidence of a whole,
unsharded matrix (quantize_evidence + scale_votes + apply_votes + pack), bit for bit, in three
steps instead of some twenty torch passes:

1. `_stats_kernel` reads g and the packed trits once and writes |g| and g * t (fp32). The row
   reductions over them are torch's own `.mean` / `.sum` on tensors holding exactly the values
   the torch path reduces, in the same layout, so s_row and dL/dE get the same bits on the same
   device (a Triton reduction sums in another order and would move a few votes). The rows' scale
   evidence x_e (rule.votes_from_scale_grad before rounding) is a few torch ops on [rows].
2. `_dense_update_kernel`, one launch per matrix: per element x = -g / (s_row + 1e-30) * rate
   (correctly rounded division, no FMA contraction), the hash uniform of rule.hash_uniform, the
   vote, the integer accumulator rule, the repacked byte; per row the scale vote (rounded with
   the same hash at position = row) and the exponent step.
3. Counts (trit flips, scale moves) stay on the device as int32 [2].

Tiles cover BLOCK_R rows x BLOCK_B packed bytes. Each byte's five base-3 digits are walked one
at a time (digit d of byte b is column 5b + d), so no gather is needed to unpack or repack.
Integer divisions act on magnitudes (truncation toward zero, like torch's rounding_mode="trunc"),
which keeps the interpreter (NumPy floor division) and the GPU (C truncation) in agreement.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from arbd.config import SCALE_K, TRITS_PER_BYTE
from arbd.ternary import packing
from arbd.ternary.rule import ACC_MAX, MIN_ROW_FOR_ROW_NORM, TernaryRule, _salt_mix

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


@triton.jit
def _byte_tile(packed_ptr, pid_r, pid_b, R, NB: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_B: tl.constexpr):
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    live = r < R
    bm = live[:, None] & (b[None, :] < NB)
    r64 = r.to(tl.int64)
    byte = tl.load(packed_ptr + r64[:, None] * NB + b[None, :], mask=bm, other=121).to(tl.int32)
    # Bytes above 242 are not base-3 trits; packing's table decodes them as five zeros.
    byte = tl.where(byte > 242, 121, byte)
    return r, r64, b, live, bm, byte


@triton.jit
def _stats_kernel(g_ptr, packed_ptr, absg_ptr, gt_ptr, R, COLS: tl.constexpr, NB: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, ABS: tl.constexpr,
                  PRODUCT: tl.constexpr):
    r, r64, b, live, bm, rest = _byte_tile(packed_ptr, tl.program_id(0), tl.program_id(1), R,
                                           NB, BLOCK_R, BLOCK_B)
    for d in tl.static_range(5):
        col = b * 5 + d
        cm = bm & (col[None, :] < COLS)
        off = r64[:, None] * COLS + col[None, :]
        g = tl.load(g_ptr + off, mask=cm, other=0.0)
        if ABS:
            tl.store(absg_ptr + off, tl.abs(g), mask=cm)
        if PRODUCT:
            trit = rest % 3 - 1
            tl.store(gt_ptr + off, g * trit.to(tl.float32), mask=cm)
        rest = rest // 3


@triton.jit(do_not_specialize=["R", "rate_bits", "salt_bits"])
def _dense_update_kernel(g_ptr, stride_gr, stride_gc, s_ptr, stride_s, packed_ptr, t_acc_ptr,
                         exp_ptr, e_acc_ptr, xe_ptr, stats_ptr, R, rate_bits, salt_bits,
                         COLS: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_B: tl.constexpr, STOCHASTIC: tl.constexpr, MAX_VOTE: tl.constexpr,
                         THRESHOLD: tl.constexpr, DECAY: tl.constexpr, FREEZE: tl.constexpr,
                         CAP: tl.constexpr, ACC_MAX: tl.constexpr, SCALES: tl.constexpr,
                         S_THRESHOLD: tl.constexpr, S_STOCHASTIC: tl.constexpr):
    pid_b = tl.program_id(1)
    r, r64, b, live, bm, rest = _byte_tile(packed_ptr, tl.program_id(0), pid_b, R, NB,
                                           BLOCK_R, BLOCK_B)
    # s_row (stride 0: the tensor mean); d = s + 1e-30 in fp32, as torch adds it
    d = tl.load(s_ptr + r * stride_s, mask=live, other=1.0) + tl.full((), 1e-30, tl.float32)
    negd = 0.0 - d
    # int32 bits of the fp32 rate torch multiplies by, and of the salt's hash mix
    rate32 = rate_bits.to(tl.int32).to(tl.float32, bitcast=True)
    salt = salt_bits.to(tl.int32).to(tl.uint32, bitcast=True)
    new_byte = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
    flips = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
    p3 = 1
    for d in tl.static_range(5):
        col = b * 5 + d
        cm = bm & (col[None, :] < COLS)
        trit = tl.where(cm, rest % 3 - 1, 0)   # padding digits repack as trit 0, as pack_trits does
        rest = rest // 3
        off = r64[:, None] * COLS + col[None, :]
        acc = tl.load(t_acc_ptr + off, mask=cm, other=0).to(tl.int32)
        if FREEZE:
            acc = acc * 0
        else:
            if DECAY > 0:
                acc = acc - _trunc_div(acc, 1 << DECAY)
            g = tl.load(g_ptr + r64[:, None] * stride_gr + col[None, :].to(tl.int64) * stride_gc,
                        mask=cm, other=0.0)
            # (-g) / d == g / (-d) exactly under round-to-nearest, signed zeros included.
            x = tl.math.div_rn(g, negd[:, None]) * rate32
            pos = r.to(tl.uint32)[:, None] * COLS + col.to(tl.uint32)[None, :]
            acc = acc + _sround(x, pos, salt, STOCHASTIC, MAX_VOTE)
        n = tl.where(cm, _trit_moves(acc, trit, THRESHOLD), 0)
        trit, acc = _settle(acc, trit, n, THRESHOLD, CAP, ACC_MAX)
        tl.store(t_acc_ptr + off, acc.to(tl.int8), mask=cm)
        new_byte += (trit + 1) * p3
        flips += tl.abs(n)
        p3 = p3 * 3
    tl.store(packed_ptr + r64[:, None] * NB + b[None, :], new_byte.to(tl.uint8), mask=bm)
    tl.atomic_add(stats_ptr, tl.sum(tl.sum(flips, axis=1), axis=0))
    if SCALES:
        if pid_b == 0:
            e = tl.load(exp_ptr + r, mask=live, other=0).to(tl.int32)
            ea = tl.load(e_acc_ptr + r, mask=live, other=0).to(tl.int32)
            if DECAY > 0:
                ea = ea - _trunc_div(ea, 1 << DECAY)
            # the row's scale vote: its x (rule.votes_from_scale_grad) hashes at position row
            xe = tl.load(xe_ptr + r, mask=live, other=0.0)
            ea += _sround(xe, r.to(tl.uint32), salt, S_STOCHASTIC, MAX_VOTE)
            m, ea = _scale_step(ea, e, live, S_THRESHOLD, ACC_MAX)
            tl.store(exp_ptr + r, (e + m).to(tl.int8), mask=live)
            tl.store(e_acc_ptr + r, ea.to(tl.int8), mask=live)
            tl.atomic_add(stats_ptr + 1, tl.sum(tl.abs(m), axis=0))


# Packed bytes per program (5 weights each) and the widest tile, in bytes along a row. One row
# of 256 bytes per program beat 16 x 64 by 1.8x at 7168 x 7168 on an H100 (bench/RESULTS.md):
# the digit planes read g at a stride of 5, and fewer rows in flight keep the lines in L1.
TILE_BYTES, TILE_MAX_B = 256, 256


def _tiles(rows: int, nb: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_B): about TILE_BYTES packed bytes per program."""
    block_b = min(TILE_MAX_B, triton.next_power_of_2(nb))
    block_r = max(1, min(TILE_BYTES // block_b, triton.next_power_of_2(rows)))
    return block_r, block_b


def supports(packed: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether dense_update can take this evidence (else the torch rule must)."""
    return grad.dtype == torch.float32 and grad.dim() == 2 and grad.device == packed.device


@functools.lru_cache(maxsize=64)
def _salt_bits(salt: int) -> int:
    """rule._salt_mix as a signed int32 (every matrix of a step shares the salt)."""
    v = _salt_mix(salt)
    return v - (1 << 32) if v >= 1 << 31 else v


def _f32_bits(v: float) -> int:
    """The bits of the fp32 torch turns a Python scalar into, as a signed int32."""
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32)[0])


def row_statistics(grad: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor,
                   rule: TernaryRule, *, need_norm: bool = True
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(s: the fp32 normaliser of quantize_evidence, [rows, 1] or 0-d, or None without
    need_norm; x_e: fp32 [rows], the scale evidence votes_from_scale_grad rounds, or None when
    scales are not learnt), with the torch path's bits on the same device."""
    rows, cols = grad.shape
    nb = packed.shape[1]
    scales = rule.learn_scales
    if not (need_norm or scales):
        return None, None
    if grad.is_contiguous():
        absg = torch.empty_like(grad) if need_norm else grad
        gt = torch.empty_like(grad) if scales else grad
        br, bb = _tiles(rows, nb)
        _stats_kernel[(triton.cdiv(rows, br), triton.cdiv(nb, bb))](
            grad, packed, absg, gt, rows, COLS=cols, NB=nb, BLOCK_R=br, BLOCK_B=bb,
            ABS=need_norm, PRODUCT=scales, num_warps=4)
    else:
        # Another layout reduces in another order: take the torch path's literal expressions.
        absg = grad.abs()
        gt = grad * packing.unpack_trits(packed, cols).to(torch.float32) if scales else None
    s = None
    if need_norm:
        s = absg.mean(dim=1, keepdim=True) if rule.norm == "row" and cols >= MIN_ROW_FOR_ROW_NORM \
            else absg.mean()
    if not scales:
        return s, None
    # rule.scale_grad on the product already formed, then votes_from_scale_grad up to _sround
    g_e = gt.sum(1) * packing.exponent_to_scale(exponent, torch.float32) * (math.log(2) / SCALE_K)
    if rule.scale_mode == "sign":
        x_e = -torch.sign(g_e) * rule.scale_rate
    else:
        x_e = -g_e / (g_e.abs().mean() + 1e-30) * rule.scale_rate
    return s, x_e


@torch.no_grad()
def dense_update(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                 e_accum: torch.Tensor, grad: torch.Tensor, rule: TernaryRule, *,
                 num_warps: int = 4) -> torch.Tensor:
    """quantize_evidence + scale_votes + apply_votes of a whole matrix's fp32 evidence grad
    [rows, cols], in place on packed uint8 [rows, nb], t_accum int8 [rows, cols] and exponent /
    e_accum int8 [rows]. Returns int32 [2] (trit flips, scale moves) on the device."""
    if not supports(packed, grad):
        raise ValueError(f"dense_update takes 2-d float32 evidence on {packed.device}, "
                         f"got {grad.dtype} {tuple(grad.shape)} on {grad.device}")
    rows, cols = t_accum.shape
    nb = packed.shape[1]
    if tuple(grad.shape) != (rows, cols) or nb != packing.packed_cols(cols):
        raise ValueError(f"shapes do not match: grad {tuple(grad.shape)}, t_accum {(rows, cols)}, "
                         f"packed {tuple(packed.shape)}")
    for name, t in (("packed", packed), ("t_accum", t_accum), ("exponent", exponent),
                    ("e_accum", e_accum)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    stats = torch.zeros(2, dtype=torch.int32, device=packed.device)
    freeze = bool(rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM)
    s, x_e = row_statistics(grad, packed, exponent, rule, need_norm=not freeze)
    s = stats if s is None else s
    br, bb = _tiles(rows, nb)
    stochastic = rule.rounding == "stochastic"
    _dense_update_kernel[(triton.cdiv(rows, br), triton.cdiv(nb, bb))](
        grad, grad.stride(0), grad.stride(1), s, 1 if s.dim() == 2 else 0, packed, t_accum,
        exponent, e_accum, stats if x_e is None else x_e, stats, rows,
        _f32_bits(rule.evidence_rate), _salt_bits(rule.salt),
        COLS=cols, NB=nb, BLOCK_R=br, BLOCK_B=bb, STOCHASTIC=stochastic,
        MAX_VOTE=rule.max_vote, THRESHOLD=rule.threshold, DECAY=rule.decay_shift, FREEZE=freeze,
        CAP=rule.saturated_cap, ACC_MAX=ACC_MAX, SCALES=x_e is not None,
        S_THRESHOLD=rule.scale_threshold, S_STOCHASTIC=stochastic, num_warps=num_warps,
        enable_fp_fusion=False)
    return stats


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
def _row_block(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr, ev_ptr, u, blk,
               COLS: tl.constexpr, COLS_P: tl.constexpr, NB: tl.constexpr, NB_P: tl.constexpr,
               PAD: tl.constexpr, BLOCK_R: tl.constexpr, THRESHOLD: tl.constexpr,
               DECAY: tl.constexpr, FREEZE: tl.constexpr, CAP: tl.constexpr,
               ACC_MAX: tl.constexpr, SCALES: tl.constexpr, S_THRESHOLD: tl.constexpr,
               GATHER: tl.constexpr, EVICT: tl.constexpr):
    """rule.apply_votes on touched rows [blk * BLOCK_R, (blk + 1) * BLOCK_R); returns the
    rows' trit flips and scale moves. GATHER: the "gather" packing of the comment above,
    else "scan"."""
    # Per-column constants (loop-invariant: the compiler hoists them).
    col = tl.arange(0, COLS_P)
    cin = col < COLS
    byte_of = col // 5
    digit = col % 5
    p3 = _pow3(digit)
    magic = (65535 + p3) // p3               # (x * magic) >> 16 == x // 3**d for x < 256
    head = (digit == 0).to(tl.int32)
    last = cin & ((digit == 4) | (col == COLS - 1))
    # digits past the last column pack as 1 (trit 0), as pack_trits pads
    pad = tl.where(col == COLS - 1, PAD, 0)
    r = tl.arange(0, BLOCK_R).to(tl.int64) + blk * BLOCK_R      # u < 2**31: no overflow
    live = r < u
    row = tl.load(idx_ptr + r, mask=live, other=0, eviction_policy=EVICT).to(tl.int64)
    if COLS == COLS_P:
        # a mask constant along the row lets the loads and stores be 16-byte vectors
        cm = live[:, None]
    else:
        cm = live[:, None] & cin[None, :]
    b = tl.arange(0, NB_P)
    bm = live[:, None] & (b[None, :] < NB)
    if GATHER:
        by = tl.load(packed_ptr + row[:, None] * NB + b[None, :], mask=bm, other=121)
        by = tl.gather(by, tl.broadcast_to(tl.minimum(byte_of, NB_P - 1)[None, :],
                                           (BLOCK_R, COLS_P)), 1)
    else:
        by = tl.load(packed_ptr + row[:, None] * NB + byte_of[None, :], mask=cm, other=121)
    by = by.to(tl.int32)
    # Bytes above 242 are not base-3 trits; packing's table decodes them as five zeros.
    by = tl.where(by > 242, 121, by)
    trit = ((by * magic[None, :]) >> 16) % 3 - 1
    off = row[:, None] * COLS + col[None, :]
    if SCALES:
        e = tl.load(exp_ptr + row, mask=live, other=0).to(tl.int32)
        ea = tl.load(e_acc_ptr + row, mask=live, other=0).to(tl.int32)
        ev = tl.load(ev_ptr + r, mask=live, other=0, eviction_policy=EVICT).to(tl.int32)
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
    flips = tl.sum(tl.abs(n), axis=1)
    if GATHER:
        # slot (b, d) takes column 5b + d; slots past COLS hold digit 1 (trit 0)
        d = tl.arange(0, 8)
        slot = b[:, None] * 5 + d[None, :]                                   # [NB_P, 8]
        src = tl.reshape(tl.minimum(slot, COLS_P - 1), (NB_P * 8,))
        t_slot = tl.reshape(tl.gather(trit, tl.broadcast_to(src[None, :], (BLOCK_R, NB_P * 8)),
                                      1), (BLOCK_R, NB_P, 8))
        dig = tl.where(slot[None, :, :] < COLS, t_slot + 1, 1)
        packed = tl.sum(tl.where(d[None, None, :] < 5, dig * _pow3(d)[None, None, :], 0), axis=2)
        tl.store(packed_ptr + row[:, None] * NB + b[None, :], packed.to(tl.uint8), mask=bm)
    else:
        packed, _ = tl.associative_scan(
            ((trit + 1) * p3[None, :], tl.broadcast_to(head[None, :], (BLOCK_R, COLS_P))), 1,
            _segment_sum)
        if PAD:
            packed += pad[None, :]
        tl.store(packed_ptr + row[:, None] * NB + byte_of[None, :], packed.to(tl.uint8),
                 mask=live[:, None] & last[None, :])
    if SCALES:
        if DECAY > 0:
            ea = ea - _trunc_div(ea, 1 << DECAY)
        ea += ev
        m, ea = _scale_step(ea, e, live, S_THRESHOLD, ACC_MAX)
        tl.store(exp_ptr + row, (e + m).to(tl.int8), mask=live)
        tl.store(e_acc_ptr + row, ea.to(tl.int8), mask=live)
        moves = tl.abs(m)
    else:
        moves = flips * 0
    return flips, moves


@triton.jit(do_not_specialize=["u"])
def _apply_votes_kernel(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr, ev_ptr,
                        stats_ptr, u, COLS: tl.constexpr, COLS_P: tl.constexpr, NB: tl.constexpr,
                        NB_P: tl.constexpr, PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                        THRESHOLD: tl.constexpr, DECAY: tl.constexpr, FREEZE: tl.constexpr,
                        CAP: tl.constexpr, ACC_MAX: tl.constexpr, SCALES: tl.constexpr,
                        S_THRESHOLD: tl.constexpr, GATHER: tl.constexpr, EVICT: tl.constexpr,
                        LOOP: tl.constexpr):
    # LOOP: a grid of a few programs per SM walks all blocks (one atomic per program); else one
    # block per program (a loop there would only hold registers: 124 against 64 at 16 x 64).
    if LOOP:
        flips = tl.zeros((BLOCK_R,), dtype=tl.int32)
        moves = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for blk in tl.range(tl.program_id(0), tl.cdiv(u, BLOCK_R), tl.num_programs(0)):
            f, m = _row_block(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr,
                              ev_ptr, u, blk, COLS, COLS_P, NB, NB_P, PAD, BLOCK_R, THRESHOLD,
                              DECAY, FREEZE, CAP, ACC_MAX, SCALES, S_THRESHOLD, GATHER, EVICT)
            flips += f
            moves += m
    else:
        flips, moves = _row_block(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr,
                                  ev_ptr, u, tl.program_id(0), COLS, COLS_P, NB, NB_P, PAD,
                                  BLOCK_R, THRESHOLD, DECAY, FREEZE, CAP, ACC_MAX, SCALES,
                                  S_THRESHOLD, GATHER, EVICT)
    tl.atomic_add(stats_ptr, tl.sum(flips, axis=0))
    if SCALES:
        tl.atomic_add(stats_ptr + 1, tl.sum(moves, axis=0))


# (rows per block, warps per program, programs per SM or None for one block per program) of the
# two packings; the tuning runs are in bench/RESULTS.md ("Touched-row update, round 2").
ROW_CONFIG = {"gather": (16, 4, None), "scan": (32, 8, 4)}


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4             # the interpreter: a few programs, so the block loop is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    programs_per_sm (None: one program per block) default to ROW_CONFIG of that packing."""
    cols, nb = t_accum.shape[1], packed.shape[1]
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
    _apply_votes_kernel[(grid,)](
        packed, t_accum, exponent, e_accum, idx.reshape(-1).contiguous(), narrow(votes),
        narrow(e_votes) if scales else stats, stats, u, COLS=cols,
        COLS_P=triton.next_power_of_2(cols), NB=nb, NB_P=triton.next_power_of_2(nb),
        PAD=(3 ** 5 - 3 ** tail) // 2 if tail else 0, BLOCK_R=br, THRESHOLD=rule.threshold,
        DECAY=rule.decay_shift, FREEZE=bool(rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM),
        CAP=rule.saturated_cap, ACC_MAX=ACC_MAX, SCALES=scales, S_THRESHOLD=rule.scale_threshold,
        GATHER=mode == "gather", EVICT="evict_first" if evict_first else "", LOOP=pps is not None,
        num_warps=nw)
    return stats
