"""The fused large-M forward (csrc/large_m.cu): y = x @ W.T for many rows of bf16 x, with W decoded
in shared memory by a producer warpgroup while two consumer warpgroups run wgmma (Hopper, sm_90a).

The default large-M path decodes W into a transient bf16 matrix and calls cuBLAS, so it is slower
than cuBLAS by the decode. This kernel never writes W in 16 bits. It reads a "pair-word" copy of W
(pairs_copy: 2 bits per trit, 0.25 bytes per weight, made per call from the base-3 rows), whose
layout lets the producer turn 16 trits into bf16 with one shift, one mask-and-or and one bf16x2
subtraction per pair.

ARBD_CUDA_LARGE_M picks whether ternary_matmul uses it: "off" (the default) or "on" (bf16 x of at
least DENSE_MIN_M rows on an sm_90 GPU, K a multiple of 8 and N even; a failed build is an error).
"""
from __future__ import annotations

import ctypes
import math

import torch

from arbd.ternary import cuda_ext, packing

SOURCE = cuda_ext.CSRC / "large_m.cu"
BLOCK_N, BLOCK_K = 256, 64
STAGES = (3, 4)
DEFAULT_STAGES = 4

_LIB: ctypes.CDLL | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_LARGE_M", "off", ("on", "off"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_pairs_copy.restype = ctypes.c_int
        lib.arbd_pairs_copy.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.arbd_large_m.restype = ctypes.c_int
        lib.arbd_large_m.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def fits(x: torch.Tensor, n: int, K: int) -> bool:
    """Whether the kernel takes these shapes: bf16 x on an sm_90 GPU, K % 8 == 0, N even."""
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] >= 1
            and K % 8 == 0 and n >= 2 and n % 2 == 0 and cuda_ext.device_info(x.device)[0] == (9, 0))


def usable(x: torch.Tensor, n: int, K: int) -> bool:
    """Whether ternary_matmul should take large_m_matmul (ARBD_CUDA_LARGE_M=on and the shapes fit);
    builds the library on the first call, so a failed build is an error, not a silent fallback."""
    if mode() != "on" or not fits(x, n, K):
        return False
    _library(x.device)
    return True


def padded_shape(n: int, K: int) -> tuple[int, int]:
    """(k_tiles, n_pad) of the pair-word copy of an [n, K] weight."""
    return math.ceil(K / BLOCK_K), math.ceil(n / BLOCK_N) * BLOCK_N


def pairs_reference(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The pair-word copy in torch (any device; the reference for tests): int32 [k_tiles, n_pad, 4].

    Word q of (kt, n) holds trits k = 64 kt + 16 q + 2 j at bits 2 j and k + 1 at bits 16 + 2 j
    (j = 0..7) as digits trit + 1; rows past n and columns past K are zero trits (digit 1).
    """
    n = packed.shape[0]
    k_tiles, n_pad = padded_shape(n, K)
    digits = torch.ones(n_pad, k_tiles * BLOCK_K, dtype=torch.int64, device=packed.device)
    digits[:n, :K] = packing.unpack_trits(packed, K).to(torch.int64) + 1
    d = digits.view(n_pad, k_tiles, 4, 8, 2)  # n, kt, q, j, (even, odd)
    shifts = 2 * torch.arange(8, device=packed.device).view(8, 1) + torch.tensor([0, 16], device=packed.device)
    words = (d << shifts).sum(dim=(3, 4))  # n, kt, q
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.permute(1, 0, 2).contiguous()


def pairs_copy(packed: torch.Tensor, K: int) -> torch.Tensor:
    """pairs_reference's layout made by one CUDA kernel (packed on an sm_90 GPU)."""
    n, kb = packed.shape
    if kb != packing.packed_cols(K):
        raise ValueError(f"packed must have {packing.packed_cols(K)} bytes per row for K={K}, got {kb}")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    k_tiles, n_pad = padded_shape(n, K)
    out = torch.empty(k_tiles, n_pad, 4, dtype=torch.int32, device=packed.device)
    err = _library(packed.device).arbd_pairs_copy(
        packed.data_ptr(), packed.stride(0), kb, n, K, n_pad, k_tiles, out.data_ptr(),
        torch.cuda.current_stream(packed.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA pair-word copy failed (code {err}) for N={n} K={K}")
    return out


def large_m_matmul(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, *,
                   pairs: torch.Tensor | None = None, stages: int = DEFAULT_STAGES,
                   out: torch.Tensor | None = None, _flags: int = 0) -> torch.Tensor:
    """y [M, N] bf16 = x [M, K] bf16 @ W.T, W as packed [N, ceil(K / 5)] trits and int8 exponents.

    `pairs`: a pair-word copy of packed made earlier (pairs_copy); made here otherwise. The scale of
    row n is the bf16 scale that packing.decode uses, applied to the fp32 sum before rounding.
    _flags: the kernel's probes (bench/gpu_gemm_large_m.py only; their output is wrong).
    """
    n = packed.shape[0]
    if not fits(x, n, K) or x.shape[1] != K:
        raise ValueError(f"large_m_matmul takes bf16 x [M, {K}] on an sm_90 GPU with K % 8 == 0 and "
                         f"N even; got x {x.dtype} {tuple(x.shape)}, N={n}")
    if stages not in STAGES:
        raise ValueError(f"stages must be one of {STAGES}, got {stages}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    k_tiles, n_pad = padded_shape(n, K)
    if pairs is None:
        pairs = pairs_copy(packed, K)
    elif tuple(pairs.shape) != (k_tiles, n_pad, 4) or pairs.dtype != torch.int32 or not pairs.is_contiguous():
        raise ValueError(f"pairs must be a contiguous int32 [{k_tiles}, {n_pad}, 4] copy, got "
                         f"{pairs.dtype} {tuple(pairs.shape)}")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(1) != 1 or y.stride(0) % 2:
        raise ValueError(f"out must be a bf16 [{m}, {n}] tensor with unit column stride and even row stride")
    table = packing.exponent_to_scale_table(x.device, torch.bfloat16)
    err = _library(x.device).arbd_large_m(
        x.data_ptr(), x.stride(0), m, K, pairs.data_ptr(), n, n_pad, table.data_ptr(),
        exponent.contiguous().data_ptr(), y.data_ptr(), y.stride(0), stages, _flags,
        torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA large-M kernel launch failed (code {err}) for M={m} N={n} K={K}")
    return y
