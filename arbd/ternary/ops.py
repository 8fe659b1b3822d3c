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
