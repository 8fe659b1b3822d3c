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
        n = tl.minimum(tl.maximum(_trunc_div(acc, THRESHOLD), -1 - trit), 1 - trit)
        n = tl.where(cm, n, 0)
        trit = trit + n
        acc = acc - n * THRESHOLD
        if CAP < ACC_MAX:
            acc = tl.where((trit == 1) & (acc > CAP), CAP,
                           tl.where((trit == -1) & (acc < -CAP), -CAP, acc))
        acc = tl.minimum(tl.maximum(acc, -ACC_MAX), ACC_MAX)
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
            m = tl.minimum(tl.maximum(_trunc_div(ea, S_THRESHOLD), -128 - e), 127 - e)
            m = tl.where(live, m, 0)
            ea = tl.minimum(tl.maximum(ea - m * S_THRESHOLD, -ACC_MAX), ACC_MAX)
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
# Each program takes BLOCK_R touched rows and reads, changes and writes back their packed trits,
# trit accumulators, exponent and scale accumulator; the torch path (TernaryMatrix._rewrite_rows)
# does the same in ~30 launches with int32 temporaries. Touched rows are held as a
# [rows, cols] tile (accumulators and votes load as contiguous vectors); tl.gather moves the
# packed bytes to their columns and the trits back into [byte, digit] slots for packing.
# Integer arithmetic only, so the result is bit-identical to the torch rule. Divisions are done on
# magnitudes (trunc toward zero, as torch's rounding_mode="trunc"), which keeps the interpreter
# (NumPy floor division) and the GPU (C truncation) in agreement.


@triton.jit
def _pow3(d):
    return tl.where(d == 0, 1, tl.where(d == 1, 3, tl.where(d == 2, 9, tl.where(d == 3, 27, 81))))


@triton.jit
def _apply_votes_kernel(packed_ptr, t_acc_ptr, exp_ptr, e_acc_ptr, idx_ptr, votes_ptr, ev_ptr,
                        stats_ptr, u, COLS: tl.constexpr, COLS_P: tl.constexpr, NB: tl.constexpr,
                        NB_P: tl.constexpr, BLOCK_R: tl.constexpr, THRESHOLD: tl.constexpr,
                        DECAY: tl.constexpr, FREEZE: tl.constexpr, CAP: tl.constexpr,
                        ACC_MAX: tl.constexpr, SCALES: tl.constexpr, S_THRESHOLD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < u
    row = tl.load(idx_ptr + r, mask=live, other=0)
    # Accumulators and votes in their natural [rows, cols] layout (contiguous, vector loads).
    col = tl.arange(0, COLS_P)
    cm = live[:, None] & (col[None, :] < COLS)
    b = tl.arange(0, NB_P)
    bm = live[:, None] & (b[None, :] < NB)
    byte = tl.load(packed_ptr + row[:, None] * NB + b[None, :], mask=bm, other=121).to(tl.int32)
    # Trit of column c: digit c % 5 of byte c // 5 (bytes moved across lanes by tl.gather).
    by_col = tl.gather(byte, tl.broadcast_to(tl.minimum(col // 5, NB_P - 1)[None, :],
                                             (BLOCK_R, COLS_P)), 1)
    trit = (by_col // _pow3(col % 5)[None, :]) % 3 - 1
    acc = tl.load(t_acc_ptr + row[:, None] * COLS + col[None, :], mask=cm, other=0).to(tl.int32)
    if DECAY > 0:
        acc = acc - _trunc_div(acc, 1 << DECAY)
    acc += tl.load(votes_ptr + r[:, None] * COLS + col[None, :], mask=cm, other=0)
    if FREEZE:
        acc = acc * 0
    n = tl.minimum(tl.maximum(_trunc_div(acc, THRESHOLD), -1 - trit), 1 - trit)
    n = tl.where(cm, n, 0)
    trit = trit + n
    acc = acc - n * THRESHOLD
    if CAP < ACC_MAX:
        acc = tl.where((trit == 1) & (acc > CAP), CAP, tl.where((trit == -1) & (acc < -CAP), -CAP, acc))
    acc = tl.minimum(tl.maximum(acc, -ACC_MAX), ACC_MAX)
    tl.store(t_acc_ptr + row[:, None] * COLS + col[None, :], acc.to(tl.int8), mask=cm)
    # Pack: slot (b, d) takes column 5b + d; slots past COLS hold digit 1 (trit 0), as
    # packing.pack_trits pads.
    d = tl.arange(0, 8)
    slot = b[:, None] * 5 + d[None, :]                                             # [NB_P, 8]
    src = tl.reshape(tl.minimum(slot, COLS_P - 1), (NB_P * 8,))
    t_slot = tl.reshape(tl.gather(trit, tl.broadcast_to(src[None, :], (BLOCK_R, NB_P * 8)), 1),
                        (BLOCK_R, NB_P, 8))
    digit = tl.where(slot[None, :, :] < COLS, t_slot + 1, 1)
    new_byte = tl.sum(tl.where(d[None, None, :] < 5, digit * _pow3(d)[None, None, :], 0), axis=2)
    tl.store(packed_ptr + row[:, None] * NB + b[None, :], new_byte.to(tl.uint8), mask=bm)
    tl.atomic_add(stats_ptr, tl.sum(tl.sum(tl.abs(n), axis=1), axis=0))
    if SCALES:
        e = tl.load(exp_ptr + row, mask=live, other=0).to(tl.int32)
        ea = tl.load(e_acc_ptr + row, mask=live, other=0).to(tl.int32)
        if DECAY > 0:
            ea = ea - _trunc_div(ea, 1 << DECAY)
        ea += tl.load(ev_ptr + r, mask=live, other=0)
        m = tl.minimum(tl.maximum(_trunc_div(ea, S_THRESHOLD), -128 - e), 127 - e)
        ea = tl.minimum(tl.maximum(ea - m * S_THRESHOLD, -ACC_MAX), ACC_MAX)
        tl.store(exp_ptr + row, (e + m).to(tl.int8), mask=live)
        tl.store(e_acc_ptr + row, ea.to(tl.int8), mask=live)
        tl.atomic_add(stats_ptr + 1, tl.sum(tl.where(live, tl.abs(m), 0), axis=0))


def apply_votes_rows(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                     e_accum: torch.Tensor, idx: torch.Tensor, votes: torch.Tensor,
                     e_votes: torch.Tensor | None, rule, *, block_r: int = 16,
                     num_warps: int = 4) -> torch.Tensor:
    """rule.apply_votes on the distinct rows idx, in place on the matrix buffers (packed uint8
    [R, nb], t_accum int8 [R, cols], exponent / e_accum int8 [R]); votes int32 [U, cols],
    e_votes int32 [U] or None. Returns int32 [2] (trit flips, scale moves) on the device, so
    nothing waits for the host. idx must be distinct (TernaryMatrix.votes() merges duplicates)."""
    from arbd.ternary.rule import ACC_MAX, MIN_ROW_FOR_ROW_NORM

    cols, nb = t_accum.shape[1], packed.shape[1]
    stats = torch.zeros(2, dtype=torch.int32, device=packed.device)
    u = idx.numel()
    if u == 0:
        return stats
    scales = bool(rule.learn_scales and e_votes is not None)
    ev = e_votes.to(torch.int32).contiguous() if scales else stats
    _apply_votes_kernel[(triton.cdiv(u, block_r),)](
        packed, t_accum, exponent, e_accum, idx.reshape(-1).contiguous(),
        votes.to(torch.int32).contiguous(), ev, stats, u, COLS=cols,
        COLS_P=triton.next_power_of_2(cols), NB=nb,
        NB_P=triton.next_power_of_2(nb), BLOCK_R=block_r, THRESHOLD=rule.threshold,
        DECAY=rule.decay_shift, FREEZE=bool(rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM),
        CAP=rule.saturated_cap, ACC_MAX=ACC_MAX, SCALES=scales, S_THRESHOLD=rule.scale_threshold,
        num_warps=num_warps)
    return stats
