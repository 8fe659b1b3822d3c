"""The fused large-M forward (csrc/large_m.cu): y = x @ W.T for many rows of bf16 x, computed as
y^T = W x^T by a persistent warp-specialised Hopper GEMM (sm_90a) that reads W's base-3 packed rows
as they are stored. Its producer warpgroup turns each stage's rows into 2-bit digits in shared
memory; its two consumer warpgroups build wgmma's register operand from them and multiply.

The default large-M path decodes W into a transient bf16 matrix and calls cuBLAS, so it is slower
than cuBLAS by the decode. This kernel never writes W in 16 bits and needs no copy of it.

ARBD_CUDA_LARGE_M picks whether ternary_matmul uses it: "off" (the default) or "on" (bf16 x of at
least DENSE_MIN_M rows on an sm_90 GPU, K and N multiples of 8; a failed build is an error).
"""
from __future__ import annotations

import ctypes

import torch

from arbd.ternary import cuda_ext, packing

SOURCE = cuda_ext.CSRC / "large_m.cu"
STAGES = (3, 4)
DEFAULT_STAGES = 4

_LIB: ctypes.CDLL | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_LARGE_M", "off", ("on", "off"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_large_m.restype = ctypes.c_int
        lib.arbd_large_m.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def fits(x: torch.Tensor, n: int, K: int) -> bool:
    """Whether the kernel takes x against an [n, K] weight: 2-D bf16 with at least one row on an sm_90
    GPU, K and n multiples of 8 (x's and y's rows are TMA boxes: 16-byte strides)."""
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] >= 1
            and K >= 8 and K % 8 == 0 and n >= 8 and n % 8 == 0
            and cuda_ext.device_info(x.device)[0] == (9, 0))


def usable(x: torch.Tensor, n: int, K: int) -> bool:
    """Whether ternary_matmul should take large_m_matmul (ARBD_CUDA_LARGE_M=on and x fits); builds
    the library on the first call, so a failed build is an error, not a silent fallback."""
    if mode() != "on" or not fits(x, n, K):
        return False
    _library(x.device)
    return True


def large_m_matmul(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, *,
                   stages: int = DEFAULT_STAGES, out: torch.Tensor | None = None, _flags: int = 0) -> torch.Tensor:
    """y [M, N] bf16 = x [M, K] bf16 @ W.T, W as packed [N, ceil(K / 5)] trits and int8 exponents.

    The scale of row n is the bf16 scale that packing.decode uses, applied to the fp32 sum before
    rounding. _flags: the kernel's probe (4: no output; bench/gpu_gemm_large_m.py only).
    """
    n, kb = packed.shape
    if not fits(x, n, K) or x.shape[1] != K:
        raise ValueError(f"large_m_matmul takes bf16 x [M, {K}] on an sm_90 GPU with K % 8 == 0 and N % 8 == 0; "
                         f"got x {x.dtype} {tuple(x.shape)} on {x.device}, N={n}")
    if kb != packing.packed_cols(K):
        raise ValueError(f"packed must have {packing.packed_cols(K)} bytes per row for K={K}, got {kb}")
    if stages not in STAGES:
        raise ValueError(f"stages must be one of {STAGES}, got {stages}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(1) != 1 or y.stride(0) % 8 or y.data_ptr() % 16:
        raise ValueError(f"out must be a bf16 [{m}, {n}] tensor with unit column stride, a row stride that is a "
                         f"multiple of 8 and a 16-byte-aligned start")
    table = packing.exponent_to_scale_table(x.device, torch.bfloat16)
    err = _library(x.device).arbd_large_m(
        x.data_ptr(), x.stride(0), m, K, packed.data_ptr(), packed.stride(0), kb, n, table.data_ptr(),
        exponent.contiguous().data_ptr(), y.data_ptr(), y.stride(0), stages, cuda_ext.device_info(x.device)[1],
        _flags, torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA large-M kernel launch failed (code {err}) for M={m} N={n} K={K}")
    return y
