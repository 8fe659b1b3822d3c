"""Triton kernels for the three products of a ternary linear layer.

    ternary_matmul             y  = x  @ W.T    x [M, K]  -> y [M, N]   (forward)
    ternary_matmul_grad_input  gx = gy @ W      gy [M, N] -> gx [M, K]  (backward, input)
    weight_grad                gW = gy.T @ x    float32 [N, K]          (backward, evidence)

For 16-bit inputs with M >= DENSE_MIN_M rows, W is decoded once into a transient dense matrix
(decode_weight) and the product goes to cuBLAS; with ARBD_CUDA_LARGE_M=on the bf16 forward takes the
fused Hopper kernel of cuda_large_m.py instead (no dense W; for inference and prefill, since training
keeps the decoded W for backward anyway). For 16-bit inputs with M <= SMALL_M_MAX rows the
forward takes _ternary_small_m_kernel (aligned row classes, plane-major x, a cheaper decode; see the
comment above it), or with ARBD_CUDA_SMALL_M=on / tiled and M <= 16 on Hopper a hand-written CUDA
kernel of cuda_small_m.py ("tiled": from a tile-major copy of W kept per weight, for inference).
Otherwise W [N, K] is never materialised: the two ternary kernels read the packed bytes of their tile
(arbd/ternary/packing.py: 5 trits per byte, base 3, least significant digit first, digit =
trit + 1) and turn them into trits in registers, right before the tensor-core product.

Digit planes. A tile of BLOCK_K packed bytes holds 5 * BLOCK_K trits, which is not a power of two,
so the tile is not expanded into one [*, 5 * BLOCK_K] matrix. Instead each byte is split into its
5 base-3 digits one at a time (lowest digit, then q //= 3; exact fp32 arithmetic, see _next_trit),
and digit d of every byte in the tile forms a [*, BLOCK_K] "plane" of trits for the K positions
k = 5 * kb + d. Each plane meets the matching columns of x (a stride-5 view of x, or a contiguous
slice of a plane-major copy of x) in its own tl.dot. Every byte is loaded once and every trit costs
four fp32 ops plus its conversion to the input dtype.

Scales. The row scale 2 ** (E / SCALE_K) belongs to output column n in the forward pass, so it is
applied to the fp32 accumulator after the reduction. In grad_input it sits on the reduced axis, so
gy's tile is multiplied by it (once per tile, shared by the 5 planes) before the products.

Accumulation is always fp32; fp32 inputs use input_precision="ieee" so that no tf32 rounding
creeps in. float64 inputs (CPU references only) take a plain torch path, see _torch_fallback.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from arbd.config import SCALE_K, TRITS_PER_BYTE
from arbd.ternary import cuda_large_m, cuda_small_m, packing

# The kernels unroll exactly five digit planes per byte.
assert TRITS_PER_BYTE == 5, "triton_kernels assumes 5 trits per byte"

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A byte whose five digits are all 1, i.e. five zero trits: the value masked-off bytes load as.
_ZERO_TRITS_BYTE = tl.constexpr(121)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one kernel.

    block_m, block_n: tile sizes along M and N. block_k: along K, counted in packed bytes (5 trits
    each) for the two ternary kernels and in elements for weight_grad. group: how many tiles along
    the first output axis walk the second axis together (keeps shared operands in L2).
    planar_x (forward only): first copy x into plane-major order [M, 5, kb] (zero-padded to whole
    tiles) so that each digit plane of x is a contiguous slice instead of a stride-5 gather.
    split_k (forward only): programs per output tile, each summing a share of K into an fp32
    buffer with atomic adds (more parallelism for small M; the summation order is not fixed).
    prefetch (forward only): load the next tile's packed bytes one iteration ahead (see the kernel).
    fixup (forward only, with split_k): the splits store fp32 partial sums (no atomics, no memset) and
    one small kernel adds them in a fixed order, scales and casts: two launches instead of three,
    and a deterministic result.
    asm_decode (bf16 / fp16 only): unpack with integer arithmetic on two bytes per 32-bit register
    (inline PTX, _decode_planes_asm) instead of the fp32 _next_trit; ignored by the interpreter.
    dense (forward and grad_input): decode W once into a transient [N, K] matrix of the input dtype
    (decode_weight) and hand the product to torch.matmul (cuBLAS). For large M, where the decode
    (about 2 * N * K bytes written) is small against the product.
    small_m (forward only, M <= block_m): _ternary_small_m_kernel instead; block_m is then the padded
    width of x (16, 32 or 64), planar_x picks the plane-major copy of x (else a stride-5 gather),
    split_k splits K into fp32 partials added by _splitk_reduce_kernel, and align (1, 4, 8 or 16
    bytes) sets the row classes. maxnreg caps registers per thread (measured slower at M = 16).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group: int = 8
    planar_x: bool = False
    split_k: int = 1
    prefetch: bool = False
    fixup: bool = False
    asm_decode: bool = False
    dense: bool = False
    small_m: bool = False
    align: int = 16
    maxnreg: int | None = None


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_coords(pid, tiles_a, tiles_b, GROUP: tl.constexpr):
    """Map a flat program id to (tile along a, tile along b).

    Programs are dealt out in bands of GROUP tiles along a; inside a band, a moves fastest. Programs
    that run at the same time then touch only GROUP tiles of a and few tiles of b, so the operands
    they share stay in L2.
    """
    band_size = GROUP * tiles_b
    band = pid // band_size
    first_a = band * GROUP
    height = tl.minimum(tiles_a - first_a, GROUP)
    within = pid % band_size
    return first_a + within % height, within // height


@triton.jit
def _next_trit(rest):
    """Split the lowest base-3 digit off the bytes of a tile, in fp32 arithmetic.

    rest holds q - 1, where q (an integer in 0..242) is what is left of each byte. Returns the trit
    (lowest digit - 1) and the same quantity for q // 3. Everything is exact: the values are small
    integers, and q // 3 = round((q - 1) / 3) because (q - 1) / 3 lies within 1/3 of an integer.
    The rounding comes from adding 1.5 * 2**23, where an fp32's last bit is worth 1 (the sum is
    never folded away: Triton compiles without fast-math). This keeps the unpacking on the fp32
    pipes (two FFMA and two FADD per trit) instead of integer division plus an int-to-float
    conversion per trit, which ran at about half the speed in a compile-only SASS count.
    """
    q3 = (rest * 0.3333333432674408 + 12582912.0) - 12582912.0  # q // 3
    return rest - 3.0 * q3, q3 - 1.0

# Two packed bytes per 32-bit register, one in each 16-bit lane, so every integer op below works on
# two bytes at once. Per digit: q3 = (q * 171) >> 9 is q // 3 for q <= 255 (lanes stay below 2**16,
# so nothing carries into the neighbour lane; the mask drops what the shift moved across), the digit
# is q - 3 * q3 (never negative, so no borrow either), and OR-ing it into the mantissa of the 16-bit
# float BIAS (bf16 128 or fp16 1024, whose last mantissa bit is worth 1) gives BIAS + digit exactly;
# one packed FMA then subtracts BIAS + 1. About 2.6 instructions per trit against about 4.5 for the
# fp32 path. Input: 4 bytes in $10; outputs: plane d in $2d (elements 0, 1) and $2d+1 (2, 3).
# PTX: the four bytes of $10 spread over the 16-bit lanes of lo (bytes 0, 1) and hi (2, 3).
_PTX_SPLIT_BYTES = """
prmt.b32 lo, $10, 0, 0x4140;
prmt.b32 hi, $10, 0, 0x4342;"""


def _ptx_low_digit(ql: str, qh: str) -> str:
    """PTX: lanes of lo / hi split into q // 3 (registers ql, qh) and BIAS + digit (dl, dh)."""
    return f"""
mul.lo.u32 {ql}, lo, 171;
mul.lo.u32 {qh}, hi, 171;
shr.u32 {ql}, {ql}, 9;
shr.u32 {qh}, {qh}, 9;
and.b32 {ql}, {ql}, 0x007F007F;
and.b32 {qh}, {qh}, 0x007F007F;
mad.lo.u32 dl, {ql}, 0xFFFFFFFD, lo;
mad.lo.u32 dh, {qh}, 0xFFFFFFFD, hi;
or.b32 dl, dl, BIAS;
or.b32 dh, dh, BIAS;"""


_DECODE_ASM = """
{
.reg .b32 lo, hi, q3l, q3h, dl, dh, one, neg;
mov.b32 one, ONE;
mov.b32 neg, NEG;""" + _PTX_SPLIT_BYTES + "".join(_ptx_low_digit("q3l", "q3h") + f"""
fma.rn.TY ${2 * d}, dl, one, neg;
fma.rn.TY ${2 * d + 1}, dh, one, neg;
mov.b32 lo, q3l;
mov.b32 hi, q3h;
""" for d in range(4)) + """
or.b32 dl, lo, BIAS;
or.b32 dh, hi, BIAS;
fma.rn.TY $8, dl, one, neg;
fma.rn.TY $9, dh, one, neg;
}
"""
_DECODE_ASM_BF16 = tl.constexpr(_DECODE_ASM.replace("BIAS", "0x43004300").replace("ONE", "0x3F803F80")
                                .replace("NEG", "0xC301C301").replace("TY", "bf16x2"))
_DECODE_ASM_FP16 = tl.constexpr(_DECODE_ASM.replace("BIAS", "0x64006400").replace("ONE", "0x3C003C00")
                                .replace("NEG", "0xE401E401").replace("TY", "f16x2"))


@triton.jit
def _decode_planes_asm(q, BF16: tl.constexpr):
    """The five digit planes of a uint8 tile as trits in bf16 (BF16) or fp16 (exact: see _DECODE_ASM)."""
    if BF16:
        return tl.inline_asm_elementwise(
            _DECODE_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r", [q],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(
            _DECODE_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r", [q],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)

@triton.jit
def _splitk_reduce_kernel(ws_ptr, e_ptr, y_ptr, M, N, SPLITS, stride_ym, inv_scale_k, BLOCK: tl.constexpr):
    # y[m, n] = scale[n] * sum over splits of ws[split, m, n], in a fixed order (deterministic).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N
    m = idx // N
    n = idx - m * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, SPLITS):
        acc += tl.load(ws_ptr + j * M * N + idx, mask=ok, other=0.0)
    e = tl.load(e_ptr + n, mask=ok, other=0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, (acc * tl.exp2(e * inv_scale_k)).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _x_plane(x_ptrs, stride_xd, kb, m_ok, K, d: tl.constexpr, X_PADDED: tl.constexpr):
    """Columns k = 5 * kb + d of x, as a [BLOCK_KB, BLOCK_M] tile."""
    if X_PADDED:
        # Plane-major copy, zero-filled up to a whole number of tiles: only rows need a mask,
        # which keeps the loads contiguous and vectorisable.
        x_mask = m_ok[None, :]
    else:
        # Columns past K (the padding digits of the last byte) read as zero, so the padding trits
        # never need to be checked.
        x_mask = (kb * 5 + d < K)[:, None] & m_ok[None, :]
    return tl.load(x_ptrs + d * stride_xd, mask=x_mask, other=0.0)


@triton.jit
def _ternary_matmul_kernel(
    x_ptr, w_ptr, e_ptr, y_ptr, ws_ptr,
    M, N, K, KB, KB_PER_SPLIT,
    stride_xm, stride_xkb, stride_xd,  # x element (m, k = 5 * kb + d) sits at m*sxm + kb*sxkb + d*sxd
    stride_wn, stride_ym,
    inv_scale_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GROUP: tl.constexpr,
    X_PADDED: tl.constexpr, ATOMIC_OUT: tl.constexpr, PREFETCH: tl.constexpr, PRECISION: tl.constexpr,
    FIXUP: tl.constexpr = False, ASM: tl.constexpr = False,
):
    # The tile is computed transposed, acc[n, m] = sum_k W[n, k] x[m, k]: the unpacked trits are the
    # left operand, which tensor cores can take straight from registers, and a small M (decode
    # batches of 16) fills the narrow side of the MMA instead of wasting most of a 64-row one.
    # Axis 1 of the grid splits K (split-K): with few rows of x there are too few output tiles to
    # keep every SM busy, so several programs share a tile and add their partial sums atomically.
    pid_n, pid_m = _tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP)
    kb_start = tl.program_id(1) * KB_PER_SPLIT
    kb_stop = tl.minimum(kb_start + KB_PER_SPLIT, KB)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kb = tl.arange(0, BLOCK_KB)
    n_ok = offs_n < N
    m_ok = offs_m < M

    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (kb_start + offs_kb)[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (kb_start + offs_kb)[:, None] * stride_xkb
    dtype = x_ptr.dtype.element_ty

    # Packed rows are only 1- or 2-byte aligned (ceil(K/5) bytes long), which rules out the
    # asynchronous copies behind Triton's software pipelining. PREFETCH loads the next tile's bytes
    # into registers by hand so that their latency overlaps this tile's work; the price is that
    # Triton then unpacks in a plain layout and moves each bf16 plane through shared memory,
    # whereas without it only the bytes make that trip. Which wins depends on the shape.
    if PREFETCH:
        q_next = tl.load(w_ptrs, mask=n_ok[:, None] & (kb_start + offs_kb < kb_stop)[None, :],
                         other=_ZERO_TRITS_BYTE)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb0 in range(kb_start, kb_stop, BLOCK_KB):
        kb = kb0 + offs_kb
        if PREFETCH:
            q = q_next
            q_next = tl.load(w_ptrs + BLOCK_KB, mask=n_ok[:, None] & (kb + BLOCK_KB < kb_stop)[None, :],
                             other=_ZERO_TRITS_BYTE)
        else:
            q = tl.load(w_ptrs, mask=n_ok[:, None] & (kb < kb_stop)[None, :], other=_ZERO_TRITS_BYTE)
        w_ptrs += BLOCK_KB
        if ASM:
            t0, t1, t2, t3, t4 = _decode_planes_asm(q, dtype == tl.bfloat16)
            acc += tl.dot(t0, _x_plane(x_ptrs, stride_xd, kb, m_ok, K, 0, X_PADDED), input_precision=PRECISION)
            acc += tl.dot(t1, _x_plane(x_ptrs, stride_xd, kb, m_ok, K, 1, X_PADDED), input_precision=PRECISION)
            acc += tl.dot(t2, _x_plane(x_ptrs, stride_xd, kb, m_ok, K, 2, X_PADDED), input_precision=PRECISION)
            acc += tl.dot(t3, _x_plane(x_ptrs, stride_xd, kb, m_ok, K, 3, X_PADDED), input_precision=PRECISION)
            acc += tl.dot(t4, _x_plane(x_ptrs, stride_xd, kb, m_ok, K, 4, X_PADDED), input_precision=PRECISION)
        else:
            rest = q.to(tl.float32) - 1.0
            for d in tl.static_range(5):
                xt = _x_plane(x_ptrs, stride_xd, kb, m_ok, K, d, X_PADDED)
                t, rest = _next_trit(rest)
                acc += tl.dot(t.to(dtype), xt, input_precision=PRECISION)
        x_ptrs += BLOCK_KB * stride_xkb

    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    y_mask = n_ok[:, None] & m_ok[None, :]
    if FIXUP:
        # Split-K partial sums, stored plainly (no atomics, no zeroing) into ws[split, m, n];
        # _splitk_reduce_kernel adds them in split order, scales and casts. A one-launch version
        # (atomic adds, a per-tile counter, the last split finishing the tile) lost sums on the
        # H100 even with a gpu-scope fence in every thread before the barrier, so it was dropped.
        ws_ptrs = (ws_ptr + tl.program_id(1).to(tl.int64) * M * N + offs_m[None, :].to(tl.int64) * N
                   + offs_n[:, None])
        tl.store(ws_ptrs, acc, mask=y_mask)
    else:
        e = tl.load(e_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        acc = acc * tl.exp2(e * inv_scale_k)[:, None]
        if ATOMIC_OUT:
            tl.atomic_add(y_ptrs, acc, mask=y_mask)  # fp32 buffer, zeroed by the caller
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# ---------------------------------------------------------------------------------------------
# Small-M forward (M <= SMALL_M_MAX): a kernel built around the byte stream.
#
# At M = 16 every packed byte meets 5 * 16 activations, so moving the bytes, decoding them and
# feeding x to the tensor cores all matter; _ternary_matmul_kernel pays for 1-byte loads that the
# software pipeline cannot take (rows are ceil(K/5) bytes long, so only 1- or 2-byte aligned), a
# stride-5 gather of x per plane, and 2.7 integer ops per trit. This path changes all three:
#   * Row classes. A program takes rows r, r + G, r + 2G, ... of one class r (G = ALIGN /
#     gcd(KB, ALIGN)); every row of a class starts the same distance s_r = (r * KB) % ALIGN past an
#     ALIGN-byte boundary, so the program reads each row from s_r bytes before its start and all of
#     its loads are ALIGN-byte aligned: vector loads that Triton's pipeline can copy asynchronously.
#     The s_r leading bytes belong to the previous row and meet zero activations (see below), as do
#     bytes past the row's end.
#   * x as planes. A small first kernel writes xp[d, PAD + kb, m] = x[m, 5 * kb + d] (zero outside
#     x, including PAD leading rows for the shifted reads), so each plane tile is a contiguous block
#     that goes to shared memory and straight into the MMA. (X_PLANAR=False gathers from x instead.)
#   * A cheaper decode (_DECODE2_ASM): after the first digit, the digits come out of packed 16-bit
#     float FMAs, about 1.8 instructions per trit.
# Split-K partial sums go to a workspace and _splitk_reduce_kernel adds, scales and casts them.
# H100, M = 16, K = N = 7168 (bench/RESULTS.md): 0.020 ms per call (x planes 1.6 us, main kernel
# 15.7 us, reduce 2.0 us) against 0.0375 ms for cuBLAS bf16; the main kernel issues in only about a
# third of its cycles (three 4-warp programs per SM at most, by registers and shared memory; the
# MMAs with register operands wait for each other), so it is far from the bandwidth floor.

# Two bytes per 32-bit register (one per 16-bit lane). Digit 0 as in _DECODE_ASM (q1 = q // 3 by
# (q * 171) >> 9). Then u = BIAS + q1 is a 16-bit float whose last mantissa bit is worth 1 (bf16:
# 128 + q1, fp16: 1024 + q1), and one FMA gives the next quotient in the same form,
# u' = fma(u, THIRD, C) = BIAS + q1 // 3 (THIRD = 1/3 rounded to the format, C chosen so that the
# round-to-nearest lands on the floor for every q; checked for all 243 bytes in the tests), one
# FMA gives the digit against an exact offset, fma(u', -3, u) = trit - OFS (OFS = 2 * BIAS - 1), and
# one more removes OFS. The last digit is u - (BIAS + 1). 18 instructions per 10 trits.
_DECODE2_ASM = """
{
.reg .b32 lo, hi, ql, qh, dl, dh, ul, uh, nl, nh, al, ah, third, cc, neg3, one, cadd, csub;
mov.b32 third, THIRD;
mov.b32 cc, CC;
mov.b32 neg3, NEG3;
mov.b32 one, ONE;
mov.b32 cadd, CADD;
mov.b32 csub, CSUB;""" + _PTX_SPLIT_BYTES + _ptx_low_digit("ql", "qh") + """
fma.rn.TY $0, dl, one, csub;
fma.rn.TY $1, dh, one, csub;
or.b32 ul, ql, BIAS;
or.b32 uh, qh, BIAS;
""" + "".join(f"""
fma.rn.TY nl, ul, third, cc;
fma.rn.TY nh, uh, third, cc;
fma.rn.TY al, nl, neg3, ul;
fma.rn.TY ah, nh, neg3, uh;
fma.rn.TY ${2 * d}, al, one, cadd;
fma.rn.TY ${2 * d + 1}, ah, one, cadd;
mov.b32 ul, nl;
mov.b32 uh, nh;
""" for d in range(1, 4)) + """
fma.rn.TY $8, ul, one, csub;
fma.rn.TY $9, uh, one, csub;
}
"""
# Constants, both lanes: BIAS (128 / 1024), THIRD (bf16 171/512, fp16 1365/4096), C (85 / 682.5),
# -3, 1, OFS = 255 / 2047, -(BIAS + 1) = -129 / -1025.
_DECODE2_CONSTS = {
    "bf16x2": dict(BIAS="0x43004300", THIRD="0x3EAB3EAB", CC="0x42AA42AA", NEG3="0xC040C040",
                   ONE="0x3F803F80", CADD="0x437F437F", CSUB="0xC301C301"),
    "f16x2": dict(BIAS="0x64006400", THIRD="0x35553555", CC="0x61556155", NEG3="0xC200C200",
                  ONE="0x3C003C00", CADD="0x67FF67FF", CSUB="0xE401E401"),
}


def _decode2_asm(ty: str) -> str:
    text = _DECODE2_ASM.replace("TY", ty)
    for key, value in _DECODE2_CONSTS[ty].items():
        text = text.replace(key, value)
    return text


_DECODE2_ASM_BF16 = tl.constexpr(_decode2_asm("bf16x2"))
_DECODE2_ASM_FP16 = tl.constexpr(_decode2_asm("f16x2"))


@triton.jit
def _decode2_planes(q, BF16: tl.constexpr):
    """The five digit planes of a uint8 tile as bf16 (BF16) or fp16 trits, exact (_DECODE2_ASM)."""
    if BF16:
        return tl.inline_asm_elementwise(
            _DECODE2_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r", [q],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(
            _DECODE2_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r", [q],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _x_planes_kernel(x_ptr, xp_ptr, M, K, stride_xm, ROWS, PAD, MP: tl.constexpr, BLOCK_R: tl.constexpr):
    # xp[d, r, m] = x[m, 5 * (r - PAD) + d] for r < ROWS, m < MP; zero where that is outside x.
    # All five loads are issued before the first store, so the program waits for memory once.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = rows - PAD
    offs_m = tl.arange(0, MP)
    ok = (kb >= 0)[:, None] & (offs_m < M)[None, :]
    src = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (kb * 5)[:, None]
    v0 = tl.load(src + 0, mask=ok & (kb * 5 + 0 < K)[:, None], other=0.0)
    v1 = tl.load(src + 1, mask=ok & (kb * 5 + 1 < K)[:, None], other=0.0)
    v2 = tl.load(src + 2, mask=ok & (kb * 5 + 2 < K)[:, None], other=0.0)
    v3 = tl.load(src + 3, mask=ok & (kb * 5 + 3 < K)[:, None], other=0.0)
    v4 = tl.load(src + 4, mask=ok & (kb * 5 + 4 < K)[:, None], other=0.0)
    dst = xp_ptr + rows[:, None].to(tl.int64) * MP + offs_m[None, :]
    keep = (rows < ROWS)[:, None]
    plane = ROWS.to(tl.int64) * MP
    tl.store(dst, v0, mask=keep)
    tl.store(dst + plane, v1, mask=keep)
    tl.store(dst + 2 * plane, v2, mask=keep)
    tl.store(dst + 3 * plane, v3, mask=keep)
    tl.store(dst + 4 * plane, v4, mask=keep)


@triton.jit
def _small_m_x_tile(x_ptr, xp_ptr, p, offs_m, M, K, stride_xm, ROWS, PAD,
                    d: tl.constexpr, MP: tl.constexpr, X_PLANAR: tl.constexpr):
    """Activations for plane d at row-relative byte positions p: a [len(p), MP] tile, zero outside x."""
    if X_PLANAR:
        return tl.load(xp_ptr + d * ROWS * MP + (PAD + p)[:, None] * MP + offs_m[None, :])
    else:
        k = p * 5 + d
        return tl.load(x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + k[:, None],
                       mask=((p >= 0) & (k < K))[:, None] & (offs_m < M)[None, :], other=0.0)


@triton.jit
def _ternary_small_m_kernel(
    x_ptr, xp_ptr, w_ptr, e_ptr, y_ptr, ws_ptr,
    M, N, K, KB, W_TOTAL, ROWS, PAD, TILES_PER_SPLIT,
    stride_xm, stride_ym, inv_scale_k,
    G: tl.constexpr, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, MP: tl.constexpr,
    X_PLANAR: tl.constexpr, SPLIT_OUT: tl.constexpr, DECODE: tl.constexpr, PRECISION: tl.constexpr,
):
    # Output tile, transposed: acc[i, m] for rows n = base + r + G * i of W and all MP columns of y.
    # The decoded trits are the left operand, so M = 16 sits on the narrow side of the MMA.
    pid = tl.program_id(0)
    r = pid % G
    base = (pid // G) * (BLOCK_N * G)
    shift = (r * KB) % ALIGN
    offs_i = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KB)
    offs_m = tl.arange(0, MP)
    rows = base + r + G * offs_i
    # Byte offset of each row's first loaded byte (s_r before the row): a multiple of ALIGN.
    row_start = tl.multiple_of(rows.to(tl.int64) * KB - shift, ALIGN)
    n_tiles = tl.cdiv(KB + shift, BLOCK_KB)
    t_start = tl.program_id(1) * TILES_PER_SPLIT
    t_stop = tl.minimum(t_start + TILES_PER_SPLIT, n_tiles)
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
    for t in range(t_start, t_stop):
        offs = row_start[:, None] + (t * BLOCK_KB + offs_j)[None, :]
        # Only the end of the buffer needs a mask: bytes of a neighbouring row meet zero activations.
        q = tl.load(w_ptr + offs, mask=offs < W_TOTAL)
        p = t * BLOCK_KB - shift + offs_j  # byte position inside the row, -shift .. KB + ALIGN
        x0 = _small_m_x_tile(x_ptr, xp_ptr, p, offs_m, M, K, stride_xm, ROWS, PAD, 0, MP, X_PLANAR)
        x1 = _small_m_x_tile(x_ptr, xp_ptr, p, offs_m, M, K, stride_xm, ROWS, PAD, 1, MP, X_PLANAR)
        x2 = _small_m_x_tile(x_ptr, xp_ptr, p, offs_m, M, K, stride_xm, ROWS, PAD, 2, MP, X_PLANAR)
        x3 = _small_m_x_tile(x_ptr, xp_ptr, p, offs_m, M, K, stride_xm, ROWS, PAD, 3, MP, X_PLANAR)
        x4 = _small_m_x_tile(x_ptr, xp_ptr, p, offs_m, M, K, stride_xm, ROWS, PAD, 4, MP, X_PLANAR)
        if DECODE == 2:
            t0, t1, t2, t3, t4 = _decode2_planes(q, dtype == tl.bfloat16)
        elif DECODE == 1:
            t0, t1, t2, t3, t4 = _decode_planes_asm(q, dtype == tl.bfloat16)
        else:
            rest = q.to(tl.float32) - 1.0
            t0, rest = _next_trit(rest)
            t1, rest = _next_trit(rest)
            t2, rest = _next_trit(rest)
            t3, t4 = _next_trit(rest)
            t0 = t0.to(dtype)
            t1 = t1.to(dtype)
            t2 = t2.to(dtype)
            t3 = t3.to(dtype)
            t4 = t4.to(dtype)
        acc = tl.dot(t0, x0, acc, input_precision=PRECISION)
        acc = tl.dot(t1, x1, acc, input_precision=PRECISION)
        acc = tl.dot(t2, x2, acc, input_precision=PRECISION)
        acc = tl.dot(t3, x3, acc, input_precision=PRECISION)
        acc = tl.dot(t4, x4, acc, input_precision=PRECISION)

    n_ok = rows < N
    mask = n_ok[:, None] & (offs_m < M)[None, :]
    if SPLIT_OUT:
        ws_ptrs = ws_ptr + (tl.program_id(1).to(tl.int64) * M + offs_m[None, :]) * N + rows[:, None]
        tl.store(ws_ptrs, acc, mask=mask)
    else:
        e = tl.load(e_ptr + rows, mask=n_ok, other=0).to(tl.float32)
        acc = acc * tl.exp2(e * inv_scale_k)[:, None]
        tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + rows[:, None], acc.to(dtype), mask=mask)


# Magic multipliers: (q * _DIV_POW3[d]) >> 16 == q // 3**d for every byte q <= 255 (the rounding up of
# 2**16 / 3**d adds at most q / 2**16 * 0.92 < 1 / 3**d), checked for all bytes in the tests.
@triton.jit
def _div_pow3_mul(d):
    return tl.where(d == 0, 65536, tl.where(d == 1, 21846, tl.where(d == 2, 7282, tl.where(d == 3, 2428, 810))))


@triton.jit
def _decode_kernel(w_ptr, e_ptr, table_ptr, o_ptr, N, K, stride_wn, stride_on,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One [BLOCK_R, BLOCK_C] tile of the decoded W, written contiguously (vector stores); each
    # packed byte is read by the five columns it holds (the repeats hit L1). The scale comes from
    # a table in the output dtype rounded from float64, so the result equals packing.decode.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < N
    c_ok = cols < K
    byte = cols // 5
    d = cols - 5 * byte
    q = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + byte[None, :],
                mask=r_ok[:, None] & c_ok[None, :], other=_ZERO_TRITS_BYTE).to(tl.int32)
    qd = (q * _div_pow3_mul(d)[None, :]) >> 16
    trit = qd - 3 * ((qd * 21846) >> 16) - 1
    e = tl.load(e_ptr + rows, mask=r_ok, other=0).to(tl.int32)
    scale = tl.load(table_ptr + e + 128, mask=r_ok, other=0.0)
    out = trit.to(o_ptr.dtype.element_ty) * scale[:, None]
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :], out,
             mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _ternary_grad_input_kernel(
    g_ptr, w_ptr, e_ptr, o_ptr,
    M, N, K, KB,
    stride_gm, stride_wn, stride_om,
    inv_scale_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Output tile: rows m, and the 5 * BLOCK_KB columns k = 5 * kb + d held by BLOCK_KB bytes,
    # kept as five [BLOCK_M, BLOCK_KB] accumulators, one per digit plane.
    pid_m, pid_kb = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(KB, BLOCK_KB), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kb = pid_kb * BLOCK_KB + tl.arange(0, BLOCK_KB)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    kb_ok = offs_kb < KB

    g_ptrs = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_kb[None, :]
    dtype = g_ptr.dtype.element_ty

    acc0 = tl.zeros((BLOCK_M, BLOCK_KB), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_KB), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_KB), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_KB), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_M, BLOCK_KB), dtype=tl.float32)
    # Bytes prefetched one tile ahead by hand, as in the forward kernel.
    q_next = tl.load(w_ptrs, mask=(offs_n < N)[:, None] & kb_ok[None, :], other=_ZERO_TRITS_BYTE)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < N
        q = q_next
        w_ptrs += BLOCK_N * stride_wn
        q_next = tl.load(w_ptrs, mask=(n + BLOCK_N < N)[:, None] & kb_ok[None, :], other=_ZERO_TRITS_BYTE)
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        e = tl.load(e_ptr + n, mask=n_ok, other=0).to(tl.float32)
        # The scale lives on the reduced axis n: fold it into gy once for all five planes.
        g = (g.to(tl.float32) * tl.exp2(e * inv_scale_k)[None, :]).to(dtype)
        rest = q.to(tl.float32) - 1.0
        t0, rest = _next_trit(rest)
        acc0 += tl.dot(g, t0.to(dtype), input_precision=PRECISION)
        t1, rest = _next_trit(rest)
        acc1 += tl.dot(g, t1.to(dtype), input_precision=PRECISION)
        t2, rest = _next_trit(rest)
        acc2 += tl.dot(g, t2.to(dtype), input_precision=PRECISION)
        t3, rest = _next_trit(rest)
        acc3 += tl.dot(g, t3.to(dtype), input_precision=PRECISION)
        t4, rest = _next_trit(rest)
        acc4 += tl.dot(g, t4.to(dtype), input_precision=PRECISION)
        g_ptrs += BLOCK_N

    # Plane d holds columns 5 * kb + d: stride-5 stores, each output element written once.
    out_dtype = o_ptr.dtype.element_ty
    o_ptrs = o_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_kb[None, :] * 5
    k0 = offs_kb * 5
    tl.store(o_ptrs + 0, acc0.to(out_dtype), mask=m_ok[:, None] & (k0 + 0 < K)[None, :])
    tl.store(o_ptrs + 1, acc1.to(out_dtype), mask=m_ok[:, None] & (k0 + 1 < K)[None, :])
    tl.store(o_ptrs + 2, acc2.to(out_dtype), mask=m_ok[:, None] & (k0 + 2 < K)[None, :])
    tl.store(o_ptrs + 3, acc3.to(out_dtype), mask=m_ok[:, None] & (k0 + 3 < K)[None, :])
    tl.store(o_ptrs + 4, acc4.to(out_dtype), mask=m_ok[:, None] & (k0 + 4 < K)[None, :])


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, o_ptr,
    M, N, K,
    stride_gm, stride_xm, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # A plain tiled gy.T @ x reducing over the M rows; gy.T is read through transposed pointers.
    pid_n, pid_k = _tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    k_ok = offs_k < K

    gt_ptrs = g_ptr + offs_m[None, :].to(tl.int64) * stride_gm + offs_n[:, None]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = m0 + offs_m < M
        gt = tl.load(gt_ptrs, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        xx = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(gt, xx, input_precision=PRECISION)
        gt_ptrs += BLOCK_M * stride_gm
        x_ptrs += BLOCK_M * stride_xm

    o_ptrs = o_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(o_ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch shapes


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# From this many rows of x on, the 16-bit forward and grad_input decode W once and call cuBLAS
# (TileConfig.dense): the decode writes 2 * N * K bytes (63 us at K = N = 7168 on the H100), small
# against the product at large M; at M = 256 and 1024 it already beat the fused kernels
# (0.47x / 0.72x cuBLAS against 0.43x / 0.35x, bench/RESULTS.md).
DENSE_MIN_M = 256


# cuBLAS spends 0.1-4 ms of host time on a product shape it has not run before in the process and
# ~20-30 us on one it has (H100, torch 2.11, bench/host_overhead.py --shapes). Expert batches
# change M every call, so products whose M is not a round size run on M rounded up to one of eight
# sizes per octave (at most 12.5% more rows); the shapes then repeat from step to step.
def bucket_rows(m: int) -> int:
    """The smallest multiple of 2**(bit_length(m) - 4) (at least 128) that is >= m."""
    step = 1 << max(7, m.bit_length() - 4)
    return -(-m // step) * step


def cublas_rows(m: int) -> int:
    """The rows a cuBLAS product with m rows runs on: bucket_rows(m) from DENSE_MIN_M on, else m
    (below it the forward and grad_input take the Triton kernels)."""
    return bucket_rows(m) if m >= DENSE_MIN_M else m


def pad_rows(t: torch.Tensor, rows: int, *, zero: bool) -> torch.Tensor:
    """t [m, k] extended to `rows` rows; the new rows are zeros, or left unset if not `zero`."""
    m = t.shape[0]
    if rows == m:
        return t
    out = torch.empty(rows, t.shape[1], dtype=t.dtype, device=t.device)
    out[:m] = t
    if zero:
        out[m:].zero_()  # only the new rows: a memset of the whole buffer would write it twice
    return out


def mm_rows_bucketed(a: torch.Tensor, b: torch.Tensor, bucket: bool = True) -> torch.Tensor:
    """a @ b, run on a's rows padded to cublas_rows (the extra output rows are dropped); with
    `bucket` False, on a's rows as they are (callers whose row count never changes)."""
    m = a.shape[0]
    rows = cublas_rows(m) if bucket else m
    if rows == m:
        return a @ b
    return (pad_rows(a, rows, zero=False) @ b)[:m]


# Up to this many rows of x, the 16-bit forward takes _ternary_small_m_kernel (small_m_config).
# H100, K = N = 7168: M = 1 / 16 / 32 ran in 17.5 / 19.9 / 25.9 us against 26.2 / 26.5 / 46.5 us for
# the fused kernel below (bench/RESULTS.md).
SMALL_M_MAX = 32


def takes_dense_path(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether ternary_matmul(x, W [n, k]) with its default config decodes W and hands the product
    to cuBLAS (16-bit x of at least DENSE_MIN_M rows on the GPU)."""
    m = x.shape[0]
    return (x.dtype in (torch.bfloat16, torch.float16) and m > 0 and n > 0
            and matmul_config(m, n, k, x.device, x.dtype).dense)


def small_m_config(m: int, n: int, k: int, device: torch.device | None = None) -> TileConfig:
    """Launch shape of the small-M forward: split-K up to as many programs as fit on the SMs at once
    (three per SM at this shape's registers and shared memory), never into a second wave.

    H100, M = 16, K = N = 7168 (112 programs before splitting): split 1 / 2 / 3 / 4 ran in
    20.9 / 19.7 / 19.9 / 21.3 us per call; wider blocks, mma.sync shapes and register caps were slower.
    """
    kb = math.ceil(k / 5)
    block_n, block_k, align = 64, 64, 16
    classes = align // math.gcd(kb, align)
    programs = math.ceil(n / (block_n * classes)) * classes
    sms = _sm_count(device) if device is not None and device.type == "cuda" else 132
    split = max(1, min(3 * sms // programs, math.ceil((kb + align - 1) / block_k)))
    return TileConfig(_pow2_between(m, 16, 64), block_n, block_k, num_warps=4, num_stages=3, split_k=split,
                      planar_x=True, asm_decode=True, small_m=True, align=align)


def matmul_config(m: int, n: int, k: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Default tile shape for ternary_matmul (block_k in packed bytes)."""
    kb = math.ceil(k / 5)
    if _interpreting():
        # The interpreter pays per program and per op, not per FLOP: few, large tiles.
        return TileConfig(_pow2_between(m, 16, 64), _pow2_between(n, 16, 128), _pow2_between(kb, 16, 64))
    if m <= SMALL_M_MAX and dtype != torch.float32:
        return small_m_config(m, n, k, device)
    if m <= 64:
        # Bound by reading the packed bytes: one M tile, and split-K up to about eight programs
        # per SM. The 2-byte-aligned packed rows rule out asynchronous copies, so only other
        # programs hide the load latency, and many short programs also even out the last wave
        # (H100, M=16, K=N=7168: split 1 / 3 / 5 / 10 ran in 91 / 45 / 50 / 40 us; bench/RESULTS.md).
        # Split-K partials + one reduce kernel (fixup), and the PTX decode for 16-bit inputs.
        block_m, block_n, block_k = _pow2_between(m, 16, 64), 64, 32
        tiles = math.ceil(n / block_n)
        sms = _sm_count(device) if device is not None and device.type == "cuda" else 132
        split = max(1, min(math.ceil(8 * sms / tiles), math.ceil(kb / (2 * block_k))))
        return TileConfig(block_m, block_n, block_k, num_warps=4, num_stages=3, split_k=split,
                          fixup=True, asm_decode=True)
    if m >= DENSE_MIN_M and dtype != torch.float32:
        return TileConfig(128, 128, 32, dense=True)
    # Fastest of the shapes measured at M=8192 (prefetch and the stride-5 x were slower).
    return TileConfig(128, 128, 32, num_warps=8, num_stages=3, planar_x=True)


def grad_input_config(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Default tile shape for ternary_matmul_grad_input (block_n is the reduced axis)."""
    kb = math.ceil(k / 5)
    if _interpreting():
        return TileConfig(_pow2_between(m, 16, 64), _pow2_between(n, 16, 128), _pow2_between(kb, 16, 64))
    if m <= 64:
        return TileConfig(_pow2_between(m, 16, 64), 64, 32, num_warps=4, num_stages=3)
    if dtype == torch.float32:
        return TileConfig(128, 64, 32, num_warps=8, num_stages=3)  # the fp32 shape checked on the GPU
    if m >= DENSE_MIN_M:
        return TileConfig(128, 128, 32, dense=True)
    return TileConfig(128, 128, 32, num_warps=8, num_stages=3)  # fastest measured at M=8192


def weight_grad_config(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Default tile shape for weight_grad (block_m is the reduced axis, block_k in elements)."""
    if _interpreting():
        return TileConfig(_pow2_between(m, 16, 64), _pow2_between(n, 16, 128), _pow2_between(k, 16, 128))
    if dtype == torch.float32:
        return TileConfig(64, 128, 128, num_warps=8, num_stages=3)  # 4-byte tiles: less shared memory
    return TileConfig(64, 128, 256, num_warps=8, num_stages=3)  # fastest measured at M=8192


# ---------------------------------------------------------------------------------------------
# Checks and helpers


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(t.shape)}")
    if t.dtype not in _KERNEL_DTYPES + (torch.float64,):
        raise ValueError(f"{name} must be float32, float16, bfloat16 (or float64), got {t.dtype}")


def _check_weight(packed: torch.Tensor, exponent: torch.Tensor, k: int) -> int:
    """Validate the packed weight for k input features; return its row count N."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"K must be a positive int, got {k!r}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    expected_cols = packing.packed_cols(k)
    if packed.dim() != 2 or packed.shape[1] != expected_cols:
        raise ValueError(f"packed must have shape [N, {expected_cols}] for K={k}, got {tuple(packed.shape)}")
    n = packed.shape[0]
    if exponent.dtype != torch.int8:
        raise ValueError(f"exponent must be int8, got {exponent.dtype}")
    if tuple(exponent.shape) != (n,):
        raise ValueError(f"exponent must have shape ({n},) to match packed, got {tuple(exponent.shape)}")
    return n


def _check_devices(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda":   # the CUDA path, hot in a training step, pays for nothing more
        if not _interpreting():
            raise ValueError(f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device}")
        check_interpreted_dtype(device, *(t.dtype for t in tensors))


def check_interpreted_dtype(device: torch.device, *dtypes: torch.dtype) -> None:
    """Refuse bfloat16 in Triton's CPU interpreter: it converts bf16 to and from float32 correctly
    but gets bf16 arithmetic and bitcasts wrong (garbage, not rounding: checked with triton 3.9),
    so a kernel would return wrong numbers without any error."""
    if device.type != "cuda" and _interpreting() and torch.bfloat16 in dtypes:
        raise ValueError("Triton's interpreter (TRITON_INTERPRET=1) computes bfloat16 wrongly; on "
                         "CPU pass float32 or float16 tensors (or use the torch backend), or run "
                         "bfloat16 on a CUDA device")


def _precision(dtype: torch.dtype) -> str:
    # "ieee" keeps fp32 products exact fp32 (no tf32); 16-bit inputs are exact on tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _torch_fallback(packed: torch.Tensor, exponent: torch.Tensor, k: int) -> torch.Tensor:
    # float64 is only used for CPU references, which tensor cores do not serve: decoding W there is
    # acceptable and keeps the float64 answer exact.
    return packing.decode(packed, exponent, k, torch.float64)


def _plane_major(x: torch.Tensor, kb: int) -> torch.Tensor:
    """x [M, K] -> [M, 5, kb] with [m, d, j] = x[m, 5 * j + d], zero where 5 * j + d >= K."""
    x = torch.nn.functional.pad(x, (0, 5 * kb - x.shape[1]))
    return x.reshape(x.shape[0], kb, 5).transpose(1, 2).contiguous()


def _small_m_matmul(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, cfg: TileConfig,
                    out: torch.Tensor | None = None, decode: int = 2) -> torch.Tensor:
    """ternary_matmul through _ternary_small_m_kernel (M <= cfg.block_m); `out` [M, N] may be given.

    decode (16-bit inputs with cfg.asm_decode, compiled only): 2 = _DECODE2_ASM, 1 = _DECODE_ASM;
    otherwise the fp32 _next_trit path.
    """
    m = x.shape[0]
    n, kb = packed.shape
    mp = cfg.block_m
    assert m <= mp, f"small-M kernel takes at most {mp} rows, got {m}"
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    x = x.contiguous()
    packed = packed.contiguous()
    exponent = exponent.contiguous()
    # Row classes need the buffer itself ALIGN-aligned; otherwise read byte by byte (one class).
    align = cfg.align if packed.data_ptr() % cfg.align == 0 else 1
    g = align // math.gcd(kb, align)
    n_tiles = triton.cdiv(kb + align - 1, cfg.block_k)
    pad = align
    rows = pad + n_tiles * cfg.block_k
    if cfg.planar_x:
        xp = torch.empty(5, rows, mp, dtype=x.dtype, device=x.device)
        block_r = 64
        _x_planes_kernel[(triton.cdiv(rows, block_r),)](x, xp, m, K, x.stride(0), rows, pad, MP=mp,
                                                        BLOCK_R=block_r, num_warps=4)
    else:
        xp = x  # unused
    per_split = triton.cdiv(n_tiles, max(cfg.split_k, 1))
    splits = triton.cdiv(n_tiles, per_split)
    ws = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    asm = cfg.asm_decode and x.dtype in (torch.bfloat16, torch.float16) and not _interpreting()
    grid = (triton.cdiv(n, cfg.block_n * g) * g, splits)
    _ternary_small_m_kernel[grid](
        x, xp, packed, exponent, y, ws, m, n, K, kb, n * kb, rows, pad, per_split,
        x.stride(0), y.stride(0), 1.0 / SCALE_K,
        G=g, ALIGN=align, BLOCK_N=cfg.block_n, BLOCK_KB=cfg.block_k, MP=mp, X_PLANAR=cfg.planar_x,
        SPLIT_OUT=splits > 1, DECODE=decode if asm else 0, PRECISION=_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
    )
    if splits > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](ws, exponent, y, m, n, splits, y.stride(0),
                                                            1.0 / SCALE_K, BLOCK=block, num_warps=4)
    return y


# ---------------------------------------------------------------------------------------------
# Public entry points


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, *,
                   config: TileConfig | None = None, bucket: bool = True) -> torch.Tensor:
    """y = x @ W.T for x [M, K] and W [N, K] given as packed trits and int8 row exponents.

    Returns [M, N] in x's dtype, accumulated in fp32. `config` overrides the default tile shape.
    `bucket`: on the dense path, cuBLAS runs on M rounded up (mm_rows_bucketed), for callers whose
    M changes from call to call; False runs it on M as it is.
    """
    _check_float("x", x)
    n = _check_weight(packed, exponent, K)
    if x.shape[1] != K:
        raise ValueError(f"x must have shape [M, {K}], got {tuple(x.shape)}")
    _check_devices(x, packed, exponent)
    if x.dtype == torch.float64:
        return x @ _torch_fallback(packed, exponent, K).t()
    m = x.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if config is None and m <= cuda_small_m.MAX_M:
        if cuda_small_m.tiled_usable(x):
            return cuda_small_m.tiled_matmul(x, cuda_small_m.tiled_copy(packed, K), exponent, n, K)
        if cuda_small_m.usable(x, packed.shape[1]):
            return cuda_small_m.small_m_matmul(x, packed, exponent, K)
    cfg = config or matmul_config(m, n, K, x.device, x.dtype)
    if cfg.dense and config is None and cuda_large_m.usable(x, n, K):
        return cuda_large_m.large_m_matmul(x, packed, exponent, K)  # ARBD_CUDA_LARGE_M=on
    if cfg.dense:
        return mm_rows_bucketed(x, decode_weight(packed, exponent, K, x.dtype).t(), bucket)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if cfg.small_m and m <= cfg.block_m:
        return _small_m_matmul(x, packed, exponent, K, cfg, out=y)
    packed = packed.contiguous()
    exponent = exponent.contiguous()
    kb = packed.shape[1]
    if cfg.planar_x:
        xs = _plane_major(x, triton.cdiv(kb, cfg.block_k) * cfg.block_k)
        strides = (xs.stride(0), 1, xs.stride(1))
    else:
        xs = x.contiguous()
        strides = (xs.stride(0), 5, 1)
    # Whole tiles per split, and no split left without work.
    kb_per_split = triton.cdiv(triton.cdiv(kb, max(cfg.split_k, 1)), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(kb, kb_per_split)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    fixup = cfg.fixup and splits > 1
    if fixup:
        out = y
        ws = torch.empty(splits * m * n, dtype=torch.float32, device=x.device)
    else:
        out = y if splits == 1 else torch.zeros(m, n, dtype=torch.float32, device=x.device)
        ws = out  # unused
    asm = cfg.asm_decode and x.dtype in (torch.bfloat16, torch.float16) and not _interpreting()
    grid = (tiles, splits)
    # The kernels multiply E by 1 / SCALE_K; exact for SCALE_K = 16, within an ulp for any value.
    _ternary_matmul_kernel[grid](
        xs, packed, exponent, out, ws, m, n, K, kb, kb_per_split, *strides,
        packed.stride(0), out.stride(0), 1.0 / SCALE_K,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KB=cfg.block_k, GROUP=cfg.group,
        X_PADDED=cfg.planar_x, ATOMIC_OUT=splits > 1 and not fixup, PREFETCH=cfg.prefetch,
        PRECISION=_precision(x.dtype), FIXUP=fixup, ASM=asm,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if fixup:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](ws, exponent, y, m, n, splits, y.stride(0),
                                                            1.0 / SCALE_K, BLOCK=block, num_warps=4)
    return y if out is y else out.to(x.dtype)


def ternary_matmul_grad_input(gy: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, *,
                              config: TileConfig | None = None) -> torch.Tensor:
    """gx = gy @ W for gy [M, N]: returns [M, K] in gy's dtype, accumulated in fp32."""
    _check_float("gy", gy)
    n = _check_weight(packed, exponent, K)
    if gy.shape[1] != n:
        raise ValueError(f"gy must have shape [M, {n}] to match packed's {n} rows, got {tuple(gy.shape)}")
    _check_devices(gy, packed, exponent)
    if gy.dtype == torch.float64:
        return gy @ _torch_fallback(packed, exponent, K)
    m = gy.shape[0]
    if m == 0 or n == 0:
        return torch.zeros(m, K, dtype=gy.dtype, device=gy.device)
    cfg = config or grad_input_config(m, n, K, gy.dtype)
    if cfg.dense:
        return mm_rows_bucketed(gy, decode_weight(packed, exponent, K, gy.dtype))
    gx = torch.empty(m, K, dtype=gy.dtype, device=gy.device)
    gy = gy.contiguous()
    packed = packed.contiguous()
    exponent = exponent.contiguous()
    kb = packed.shape[1]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(kb, cfg.block_k),)
    _ternary_grad_input_kernel[grid](
        gy, packed, exponent, gx, m, n, K, kb, gy.stride(0), packed.stride(0), gx.stride(0), 1.0 / SCALE_K,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KB=cfg.block_k, GROUP=cfg.group,
        PRECISION=_precision(gy.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return gx


def decode_weight(packed: torch.Tensor, exponent: torch.Tensor, K: int,
                  dtype: torch.dtype = torch.bfloat16, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in dtype from packed trits and int8 exponents: equal to packing.decode, bit for bit.

    One pass: reads the packed bytes, writes N * K elements (the dense path's transient matrix).
    `out`: an [N, K] tensor of dtype with unit column stride to write into (e.g. one expert's
    slice of a stacked weight).
    """
    n = _check_weight(packed, exponent, K)
    _check_devices(packed, exponent)
    if not packed.is_cuda:
        check_interpreted_dtype(packed.device, dtype)
    if out is not None and (tuple(out.shape) != (n, K) or out.dtype != dtype
                            or (K > 1 and out.stride(1) != 1) or out.device != packed.device):
        raise ValueError(f"out must be a {dtype} [{n}, {K}] tensor with unit column stride on "
                         f"{packed.device}, got {out.dtype} {tuple(out.shape)} stride {out.stride()}")
    if dtype not in _KERNEL_DTYPES:
        w = packing.decode(packed, exponent, K, dtype)
        return w if out is None else out.copy_(w)
    # The scale of every exponent -128..127 rounded once from float64, as packing.decode uses.
    table = packing.exponent_to_scale_table(packed.device, dtype)
    if out is None:
        out = torch.empty(n, K, dtype=dtype, device=packed.device)
    if n == 0:
        return out
    packed = packed.contiguous()
    block_r, block_c = (16, 128) if _interpreting() else (8, 512)
    grid = (triton.cdiv(n, block_r), triton.cdiv(K, block_c))
    _decode_kernel[grid](packed, exponent.contiguous(), table, out, n, K, packed.stride(0), out.stride(0),
                         BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def weight_grad(gy: torch.Tensor, x: torch.Tensor, *, config: TileConfig | None = None) -> torch.Tensor:
    """gW = gy.T @ x for gy [M, N] and x [M, K]: float32 [N, K] accumulated in fp32.

    float64 inputs return float64 through torch (CPU references; the evidence keeps float64).
    """
    _check_float("gy", gy)
    _check_float("x", x)
    if gy.shape[0] != x.shape[0]:
        raise ValueError(f"gy and x must have the same number of rows, got {gy.shape[0]} and {x.shape[0]}")
    if gy.dtype != x.dtype:
        raise ValueError(f"gy and x must share a dtype, got {gy.dtype} and {x.dtype}")
    _check_devices(gy, x)
    if x.dtype == torch.float64:
        return gy.t() @ x
    m, n = gy.shape
    k = x.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(n, k, dtype=torch.float32, device=x.device)
    out = torch.empty(n, k, dtype=torch.float32, device=x.device)
    cfg = config or weight_grad_config(m, n, k, x.dtype)
    gy = gy.contiguous()
    x = x.contiguous()
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(k, cfg.block_k),)
    _weight_grad_kernel[grid](
        gy, x, out, m, n, k, gy.stride(0), x.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=cfg.block_m, GROUP=cfg.group,
        PRECISION=_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
