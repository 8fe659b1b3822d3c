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


@triton.jit
def _rope_tail_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, heads, seq, sx, sign,
                      NOPE: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    r64 = rows.to(tl.int64)
    width = NOPE + 2 * HALF
    if NOPE > 0:   # channels that do not rotate: copied as they are
        c = tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (c < NOPE)[None, :]
        v = tl.load(x_ptr + r64[:, None] * sx + c[None, :], mask=m)
        tl.store(y_ptr + r64[:, None] * width + c[None, :], v, mask=m)
    i = tl.arange(0, BLOCK_H)
    m = rmask[:, None] & (i < HALF)[None, :]
    t = (rows // heads) % seq   # rows are [B, T, H] flattened
    cos = tl.load(cos_ptr + t[:, None] * HALF + i[None, :], mask=m, other=0.0)
    sin = tl.load(sin_ptr + t[:, None] * HALF + i[None, :], mask=m, other=0.0) * sign
    src = x_ptr + r64[:, None] * sx + NOPE + 2 * i[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + 1, mask=m, other=0.0).to(tl.float32)
    # Products rounded before the sum, as torch's separate kernels do (no fused multiply-add).
    a1, b1 = x1 * cos, x2 * sin
    a2, b2 = x1 * sin, x2 * cos
    dst = y_ptr + r64[:, None] * width + NOPE + 2 * i[None, :]
    tl.store(dst, (a1 - b1).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(dst + 1, (a2 + b2).to(y_ptr.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope: int, sign: float) -> torch.Tensor:
    """x [B, T, H, nope + rope] or [B, T, nope + rope], last dimension contiguous; cos / sin
    [T, rope / 2] float32. Returns a new contiguous tensor of x's shape."""
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
    block_rows = 32
    _rope_tail_kernel[(triton.cdiv(rows, block_rows),)](
        x2, cos, sin, y, rows, heads, seq, x2.stride(0), sign,
        NOPE=nope, HALF=half, BLOCK_N=triton.next_power_of_2(max(nope, 1)),
        BLOCK_H=triton.next_power_of_2(half), ROWS=block_rows)
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

