"""RMSNorm forward and backward as one Triton kernel each (issue 10).

The torch formula (`xf * rsqrt(mean(xf^2) + eps)`, cast, times the gain) runs ~7 kernels forward
and ~10 backward over activation-sized tensors, partly in float32: at arb-small 32 x 1024 the
norms' elementwise copies and multiplies were ~40 ms of a ~130 ms micro-batch's kernel time
(bench/RESULTS.md). Here each direction reads and writes each tensor once.

Numerics follow the torch formula: float32 statistics, the normalised value rounded to x's dtype,
then multiplied by the gain and rounded again. Backward returns dx for the unrounded chain (as
autograd does through the casts) and dgain = sum over rows of gy * (rounded normalised x), summed in
float32 (autograd sums bf16 products; the gain's evidence is at least as precise here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from arbd.ternary.triton_kernels import _interpreting, _sm_count, check_interpreted_dtype

@triton.jit
def _rms_fwd_kernel(x_ptr, g_ptr, y_ptr, rstd_ptr, n_rows, D, sx, sy, eps,
                    BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    m = rmask[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps)
    xhat = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * sy + cols[None, :],
             (xhat * g[None, :]).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(x_ptr, g_ptr, gy_ptr, rstd_ptr, gx_ptr, gg_ptr, n_rows, D, sx, sgy, sgx,
                    rows_per_prog, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid * rows_per_prog
    for r0 in range(start, start + rows_per_prog, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = (rows < n_rows) & (rows < start + rows_per_prog)
        m = rmask[:, None] & cmask[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + r64 * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + r64 * sgy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        acc += tl.sum(gy * xhat.to(gx_ptr.dtype.element_ty).to(tl.float32), axis=0)
        gyg = gy * g[None, :]
        c = tl.sum(gyg * xhat, axis=1) / D
        gx = rstd[:, None] * (gyg - xhat * c[:, None])
        tl.store(gx_ptr + r64 * sgx + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m)
    tl.store(gg_ptr + pid * D + cols, acc, mask=cmask)


def _shape(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, rows per tile, warps) for rows of d features."""
    block = triton.next_power_of_2(d)
    rows = max(1, min(16, 4096 // block)) if not _interpreting() else max(1, min(4, 256 // block))
    return block, rows, 4 if block * rows <= 4096 else 8


def _forward(x: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [n, d], x as [n, d] with unit column stride, rstd [n]) for rms_norm(x) * g."""
    if not x.is_cuda:
        check_interpreted_dtype(x.device, x.dtype, g.dtype)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    y = torch.empty(n, d, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block, rows, warps = _shape(d)
    if n:
        _rms_fwd_kernel[(triton.cdiv(n, rows),)](x2, g.contiguous(), y, rstd, n, d, x2.stride(0),
                                                 y.stride(0), eps, BLOCK_D=block, ROWS=rows,
                                                 num_warps=warps)
    return y, x2, rstd


def _backward(x2: torch.Tensor, g: torch.Tensor, rstd: torch.Tensor,
              gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [n, d], the gain's gradient in float32 partial sums [programs, d]; sum them over 0)."""
    n, d = x2.shape
    gy2 = gy.reshape(-1, d)
    if gy2.stride(-1) != 1:
        gy2 = gy2.contiguous()
    gx = torch.empty_like(x2)
    if not n:
        return gx, torch.zeros(1, d, dtype=torch.float32, device=x2.device)
    block, rows, warps = _shape(d)
    progs = max(1, min(triton.cdiv(n, rows), 4 * (_sm_count(x2.device) if x2.is_cuda else 4)))
    per = triton.cdiv(triton.cdiv(n, progs), rows) * rows
    progs = triton.cdiv(n, per)
    gg = torch.empty(progs, d, dtype=torch.float32, device=x2.device)   # every program writes its row
    _rms_bwd_kernel[(progs,)](x2, g.contiguous(), gy2, rstd, gx, gg, n, d, x2.stride(0),
                              gy2.stride(0), gx.stride(0), per, BLOCK_D=block, ROWS=rows,
                              num_warps=warps)
    return gx, gg


class RMSNormFn(torch.autograd.Function):
    """y = rms_norm(x) * g with both directions fused (arbd.ternary.ops.rms_norm dispatches)."""

    @staticmethod
    def forward(ctx, x, g, eps: float):
        y, x2, rstd = _forward(x, g, eps)
        ctx.save_for_backward(x2, g, rstd)
        ctx.shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x2, g, rstd = ctx.saved_tensors
        gx, gg = _backward(x2, g, rstd, gy)
        return gx.reshape(ctx.shape), gg.sum(0).to(g.dtype), None


class TernaryRMSNormFn(torch.autograd.Function):
    """RMSNormFn for a ternary gain: `g` is `matrix` ([D, 1]) decoded, and backward adds the
    gain's gradient to the matrix's evidence itself, summed in float32 and never rounded to x's
    dtype. One autograd node per call instead of a norm plus a decode node: the checkpointed
    step is bound by the host (bench/RESULTS.md). `anchor` (empty, requires grad) makes backward
    run even where x needs no gradient."""

    @staticmethod
    def forward(ctx, x, anchor, matrix, g, eps: float):
        y, x2, rstd = _forward(x, g, eps)
        ctx.save_for_backward(x2, g, rstd)
        ctx.shape, ctx.matrix = x.shape, matrix
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x2, g, rstd = ctx.saved_tensors
        gx, gg = _backward(x2, g, rstd, gy)
        ctx.matrix.add_grad(gg.sum(0).view(-1, 1))
        return (gx.reshape(ctx.shape) if ctx.needs_input_grad[0] else None), None, None, None, None
