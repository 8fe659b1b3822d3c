"""RoPE on the last channels of each head, in one Triton kernel per direction (issue 10).

MLA's query is [B, T, H, nope + rope] and only its last `rope` channels rotate. In torch that is
a split, a float32 copy, four multiplies, an add, a subtract, a stack, a cast and a cat: about
ten launches per direction over a query-sized tensor, run again when a checkpointed layer is
recomputed. The kernel reads each row once and writes it once: the first `nope` channels are
copied, the rest rotated in float32 and rounded once, as the torch formula does. Backward is the
same kernel rotating the other way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from arbd.ternary.triton_kernels import check_interpreted_dtype


ROWS, NUM_WARPS = 16, 2   # rows per program, warps per program


@triton.jit
def _rope_tail_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, heads, seq, sx, sign,
                      NOPE: tl.constexpr, HALF: tl.constexpr, BLOCK_P: tl.constexpr,
                      ROWS: tl.constexpr):
    # Whole rows in one contiguous load, seen as BLOCK_P channel pairs (2p, 2p + 1). NOPE is
    # even, so pair p < NOPE / 2 does not rotate (cos 1, sin 0: exact) and pair p >= NOPE / 2
    # rotates by angle index p - NOPE / 2.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    r64 = rows.to(tl.int64)
    width = NOPE + 2 * HALF
    c = tl.arange(0, 2 * BLOCK_P)
    m = rmask[:, None] & (c < width)[None, :]
    v = tl.load(x_ptr + r64[:, None] * sx + c[None, :], mask=m, other=0.0).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(v, [ROWS, BLOCK_P, 2]))
    p = tl.arange(0, BLOCK_P) - NOPE // 2
    t = (rows // heads) % seq   # rows are [B, T, H] flattened
    rot = rmask[:, None] & ((p >= 0) & (p < HALF))[None, :]
    cos = tl.load(cos_ptr + t[:, None] * HALF + p[None, :], mask=rot, other=1.0)
    sin = tl.load(sin_ptr + t[:, None] * HALF + p[None, :], mask=rot, other=0.0) * sign
    # Products rounded before the sum, as torch's separate kernels do (no fused multiply-add).
    a1, b1 = x1 * cos, x2 * sin
    a2, b2 = x1 * sin, x2 * cos
    y = tl.reshape(tl.join(a1 - b1, a2 + b2), [ROWS, 2 * BLOCK_P])
    tl.store(y_ptr + r64[:, None] * width + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope: int, sign: float) -> torch.Tensor:
    """x [B, T, H, nope + rope] or [B, T, nope + rope], nope even; cos / sin [T, rope / 2]
    float32. Returns a new contiguous tensor of x's shape."""
    if not x.is_cuda:
        check_interpreted_dtype(x.device, x.dtype)
    width = x.shape[-1]
    half = (width - nope) // 2
    heads = x.shape[2] if x.dim() == 4 else 1
    seq = x.shape[1]
    rows = x.numel() // width
    # Rows of one stride: [B, T, H] must flatten to a single row index with stride sx.
    x2 = x.reshape(rows, width) if x.stride(-1) == 1 else x.contiguous().reshape(rows, width)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    # width >= 2: rope_tail sends only an even rope > 0
    _rope_tail_kernel[(triton.cdiv(rows, ROWS),)](
        x2, cos, sin, y, rows, heads, seq, x2.stride(0), sign,
        NOPE=nope, HALF=half, BLOCK_P=triton.next_power_of_2(width) // 2,
        ROWS=ROWS, num_warps=NUM_WARPS)
    return y


class RopeTailFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope: int) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.nope = nope
        return _launch(x, cos, sin, nope, 1.0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(g, cos, sin, ctx.nope, -1.0), None, None, None

