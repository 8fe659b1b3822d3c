"""Backend dispatch for the three products of a ternary linear layer.

forward      y  = x  @ W.T      x [M, K], W [N, K] decoded from packed trits and row scales
grad_input   gx = gy @ W        gy [M, N]
weight_grad  gW = gy.T @ x      evidence for the accumulators, returned in float32 (float64 kept)

backend='torch' decodes W transiently and calls matmul; backend='triton' unpacks inside the
kernels (arbd/ternary/triton_kernels.py) so no decoded W is ever written to memory.
"""
from __future__ import annotations

import os

import torch

from arbd.ternary import packing

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


def linear_forward(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, k: int,
                   backend: str = "torch") -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {k}")
    if backend == "triton":
        if x.numel() == 0:   # e.g. an expert-parallel ACT step with no running tokens here
            return x.new_zeros(*x.shape[:-1], packed.shape[0])
        y = _triton().ternary_matmul(x.reshape(-1, k), packed, exponent, k)
        return y.reshape(*x.shape[:-1], packed.shape[0])
    return x @ packing.decode(packed, exponent, k, x.dtype).t()


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
                     backend: str = "torch") -> torch.Tensor:
    """acc + gy^T x (acc None: the product alone), float32 (float64 for float64 inputs).

    On CUDA with 16-bit inputs cuBLAS adds the product into acc in place: no [N, K] temporary
    and no separate add kernel (one launch instead of a Triton launch plus an add; the layer's
    backward is host-bound, bench/RESULTS.md). Elsewhere: weight_grad, then an add."""
    gy2 = gy.reshape(-1, gy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if (gy2.is_cuda and gy2.dtype in (torch.bfloat16, torch.float16) and x2.dtype == gy2.dtype
            and gy2.shape[0] > 0 and (acc is None or acc.dtype == torch.float32)
            and _addmm_into_fp32_ok(gy2.device)):
        # M is the reduced axis: zero rows add nothing (triton_kernels.cublas_rows says why)
        tk = _triton()
        rows = tk.cublas_rows(gy2.shape[0])
        gy2, x2 = tk.pad_rows(gy2, rows, zero=True), tk.pad_rows(x2, rows, zero=True)
        if acc is None:
            return torch.mm(gy2.t(), x2, out_dtype=torch.float32)
        return torch.addmm(acc, gy2.t(), x2, out_dtype=torch.float32, out=acc)
    g = weight_grad(gy2, x2, backend)
    if acc is None:
        return g if g.dtype == torch.float64 else g.to(torch.float32)
    return acc.add_(g)
