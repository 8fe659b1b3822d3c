"""Backend dispatch for the three products of a ternary linear layer.

forward      y  = x  @ W.T      x [M, K], W [N, K] decoded from packed trits and row scales
grad_input   gx = gy @ W        gy [M, N]
weight_grad  gW = gy.T @ x      evidence for the accumulators, returned in float32 (float64 kept)

backend='torch' decodes W transiently and calls matmul; backend='triton' unpacks inside the
kernels (arbd/ternary/triton_kernels.py) so no decoded W is ever written to memory.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from arbd.ternary import packing

if TYPE_CHECKING:
    from arbd.ternary.state import TernaryMatrix

BACKENDS = ("torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("backend='triton' needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU; "
                         "use backend='torch' otherwise")
    return backend


def _triton():
    from arbd.ternary import triton_kernels  # imported lazily: triton is heavy and optional on CPU
    return triton_kernels


def decode(packed: torch.Tensor, exponent: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, k] in dtype, equal to packing.decode bit for bit: one Triton launch on CUDA (the
    torch path is ~8 small kernels, which a norm gain decoded at every call pays in launches)."""
    if packed.is_cuda and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return _triton().decode_weight(packed, exponent, k, dtype)
    return packing.decode(packed, exponent, k, dtype)


def linear_forward(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, k: int,
                   backend: str = "torch", bucket: bool = True) -> torch.Tensor:
    """x @ W.T without autograd; `bucket` as in linear_forward_for_backward."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {k}")
    if backend == "triton":
        if x.numel() == 0:   # e.g. an expert-parallel ACT step with no running tokens here
            return x.new_zeros(*x.shape[:-1], packed.shape[0])
        y = _triton().ternary_matmul(x.reshape(-1, k), packed, exponent, k, bucket=bucket)
        return y.reshape(*x.shape[:-1], packed.shape[0])
    return x @ packing.decode(packed, exponent, k, x.dtype).t()


# Whether a ternary linear layer keeps its decoded W from forward to backward where N <= M (arb-small,
# H100: +0.08 GiB of peak, fewer decodes; bench/RESULTS.md). A switch for benchmarks and memory-tight
# runs. (Keeping x as the zero-padded copy cuBLAS ran on was measured too: +1.3-1.7 GiB and no faster.)
KEEP_DECODED_WEIGHT = True


def linear_forward_for_backward(x: torch.Tensor, matrix: "TernaryMatrix", backend: str = "torch",
                                bucket: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, w): linear_forward with `matrix`'s W, and the decoded W if backward should keep it.

    w is kept when the product decoded W and holding it until backward costs no more than the x
    kept anyway (N <= M): backward's input gradient then skips a second decode. What is kept
    depends on shapes only, never on what happens to be cached, as activation checkpointing
    requires (its recomputed forward must keep tensors of the same shapes). The decode itself is
    shared with earlier calls while their W is alive (TernaryMatrix.decoded_shared). `bucket`:
    cuBLAS runs on M rounded up to a repeating size (triton_kernels.cublas_rows), for callers
    whose M changes from call to call; a caller with a fixed M says False and skips the copy.
    """
    k, n = matrix.cols, matrix.rows
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if backend == "torch":
        w = _decoded(matrix, x.dtype, backend)
        y = x2 @ w.t()
    elif m > 0 and _triton().takes_dense_path(x2, n, k):
        w = _decoded(matrix, x.dtype, backend)
        y = _triton().mm_rows_bucketed(x2, w.t(), bucket)
    else:
        return linear_forward(x, matrix.packed, matrix.exponent, k, backend, bucket), None
    return y.reshape(*x.shape[:-1], n), (w if KEEP_DECODED_WEIGHT and n <= m else None)


def _decoded(matrix: "TernaryMatrix", dtype: torch.dtype, backend: str) -> torch.Tensor:
    """matrix's W in dtype as the backend decodes it, shared with calls still holding it."""
    decode = packing.decode if backend == "torch" else _triton().decode_weight
    return matrix.decoded_shared(dtype, lambda: decode(matrix.packed, matrix.exponent, matrix.cols, dtype))


def linear_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, matrix: "TernaryMatrix",
                    backend: str = "torch", need_input_grad: bool = True,
                    bucket: bool = True) -> torch.Tensor | None:
    """The backward of linear_forward_for_backward: adds gy^T x to `matrix`'s evidence and returns
    gx (or None). Where the products decode W and call cuBLAS, gy and x are padded once, with
    zero rows, to cublas_rows(M) if `bucket` (triton_kernels says why), gy for both products; without a kept
    w, a W that another call still holds (TernaryMatrix.decoded_shared) serves before a decode."""
    k, n = matrix.cols, matrix.rows
    gy2, x2 = gy.reshape(-1, n), x.reshape(-1, k)
    m = gy2.shape[0]
    cublas = backend == "torch" or (m > 0 and _triton().grad_input_config(m, n, k, gy2.dtype).dense)
    if backend == "triton" and cublas and bucket:
        tk = _triton()
        rows = tk.cublas_rows(m)
        gy2, x2 = tk.pad_rows(gy2, rows, zero=True), tk.pad_rows(x2, rows, zero=True)
    gx = None
    if need_input_grad:
        if not cublas:
            gx = linear_grad_input(gy2, matrix.packed, matrix.exponent, k, backend)
        else:
            if w is None or w.dtype != gy2.dtype:
                w = _decoded(matrix, gy2.dtype, backend)
            gx = gy2 @ w
        gx = gx[:m].reshape(*gy.shape[:-1], k)
    matrix.add_grad_product(gy2, x2, backend, bucket=bucket)
    return gx


def linear_grad_input(gy: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, k: int,
                      backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        n = gy.shape[-1]
        if gy.numel() == 0:
            return gy.new_zeros(*gy.shape[:-1], k)
        return _triton().ternary_matmul_grad_input(gy.reshape(-1, n), packed, exponent, k).reshape(*gy.shape[:-1], k)
    return gy @ packing.decode(packed, exponent, k, gy.dtype)


def weight_grad(gy: torch.Tensor, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    gy2 = gy.reshape(-1, gy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "triton":
        if gy2.shape[0] == 0:   # no rows: a zero gradient, as the matmul would give
            return torch.zeros(gy2.shape[1], x2.shape[1], dtype=torch.float32, device=gy.device)
        return _triton().weight_grad(gy2, x2)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return gy2.t().to(out_dtype) @ x2.to(out_dtype)


# torch.addmm(..., out_dtype=float32) runs cuBLAS on 16-bit inputs with an fp32 result and adds
# into the result in place. Checked once per device against a plain fp32 product (the overload is
# CUDA-only and new in torch), falling back to weight_grad + add where it is missing or wrong.
_ADDMM_OK: dict[torch.device, bool] = {}


def _addmm_into_fp32_ok(device: torch.device) -> bool:
    ok = _ADDMM_OK.get(device)
    if ok is None:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(33, 7, device=device, generator=g).to(torch.bfloat16)
            b = torch.randn(33, 5, device=device, generator=g).to(torch.bfloat16)
            acc = torch.randn(7, 5, device=device, generator=g)
            want = acc + a.float().t() @ b.float()
            got = torch.addmm(acc.clone(), a.t(), b, out_dtype=torch.float32)
            inplace = acc.clone()
            torch.addmm(inplace, a.t(), b, out_dtype=torch.float32, out=inplace)
            ok = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5)
                      and torch.allclose(inplace, want, rtol=1e-5, atol=1e-5))
        except (RuntimeError, TypeError):
            ok = False
        _ADDMM_OK[device] = ok
    return ok


def weight_grad_into(acc: torch.Tensor | None, gy: torch.Tensor, x: torch.Tensor,
                     backend: str = "torch", dtype: torch.dtype = torch.float32,
                     bucket: bool = True) -> torch.Tensor:
    """acc + gy^T x (acc None: the product alone), float32 (float64 for float64 inputs).

    On CUDA with 16-bit inputs cuBLAS adds the product into acc in place: no [N, K] temporary
    and no separate add kernel (one launch instead of a Triton launch plus an add; the layer's
    backward is host-bound, bench/RESULTS.md). Elsewhere: weight_grad, then an add. `bucket`: as
    in linear_forward_for_backward."""
    gy2 = gy.reshape(-1, gy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if dtype == torch.bfloat16 and x2.dtype != torch.float64:
        return _weight_grad_into_bf16(acc, gy2, x2, backend, bucket)
    if (gy2.is_cuda and gy2.dtype in (torch.bfloat16, torch.float16) and x2.dtype == gy2.dtype
            and gy2.shape[0] > 0 and (acc is None or acc.dtype == torch.float32)
            and _addmm_into_fp32_ok(gy2.device)):
        if bucket:
            gy2, x2 = _padded_for_cublas(gy2, x2)
        if acc is None:
            return torch.mm(gy2.t(), x2, out_dtype=torch.float32)
        return torch.addmm(acc, gy2.t(), x2, out_dtype=torch.float32, out=acc)
    g = weight_grad(gy2, x2, backend)
    if acc is None:
        return g if g.dtype == torch.float64 else g.to(torch.float32)
    return acc.add_(g)


def _padded_for_cublas(gy2: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gy and x with zero rows up to a repeating cuBLAS size. M is the reduced axis, so zero rows
    add nothing (triton_kernels.cublas_rows says why)."""
    tk = _triton()
    rows = tk.cublas_rows(gy2.shape[0])
    return tk.pad_rows(gy2, rows, zero=True), tk.pad_rows(x2, rows, zero=True)


def _weight_grad_into_bf16(acc: torch.Tensor | None, gy2: torch.Tensor, x2: torch.Tensor,
                           backend: str, bucket: bool = True) -> torch.Tensor:
    """acc + gy^T x kept in bf16: the product is summed in fp32 and rounded once, as it is
    added (cuBLAS does both in one call for bf16 inputs: beta = 1 reads acc)."""
    if gy2.is_cuda and gy2.dtype == x2.dtype == torch.bfloat16 and gy2.shape[0] > 0:
        if bucket:
            gy2, x2 = _padded_for_cublas(gy2, x2)
        if acc is None:
            return torch.mm(gy2.t(), x2)
        return torch.addmm(acc, gy2.t(), x2, out=acc)
    g = weight_grad(gy2, x2, backend)   # float32
    if acc is None:
        return g.to(torch.bfloat16)
    return acc.copy_(acc.float().add_(g))   # one rounding per added product, as cuBLAS


# RMSNorm through arbd/ternary/triton_norm.py: "auto" for 16-bit CUDA tensors; "on" wherever
# Triton runs (the interpreter in CPU tests); "off": the torch formula.
FUSED_NORM = "auto"


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dimension times the gain g [D], differentiable in both: float32
    statistics, the normalised x cast back to x's dtype, then the gain. One fused Triton kernel
    per direction where FUSED_NORM allows (same arithmetic up to float32 summation order)."""
    if use_fused_kernel(FUSED_NORM, x) and g.dtype == x.dtype:
        from arbd.ternary.triton_norm import RMSNormFn
        return RMSNormFn.apply(x, g, eps)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * g


def use_fused_kernel(setting: str, x: torch.Tensor) -> bool:
    """Whether a fused-kernel switch (FUSED_NORM, mla.FUSED_ROPE) picks its Triton kernel for x:
    "auto" = CUDA tensors in 16-bit dtypes; "on" = also float32, and CPU tensors under
    TRITON_INTERPRET=1 (tests); "off" = never."""
    if setting == "off" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if setting == "on":
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return x.is_cuda and x.dtype != torch.float32
