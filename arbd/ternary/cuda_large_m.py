"""The fused large-M forward (csrc/large_m.cu): y = x @ W.T for many rows of bf16 x, computed as
y^T = W x^T by a persistent warp-specialised Hopper GEMM (sm_90a) whose consumer warpgroups decode
W's trits straight into wgmma's register operand.

The default large-M path decodes W into a transient bf16 matrix and calls cuBLAS, so it is slower
than cuBLAS by the decode. This kernel never writes W in 16 bits. It reads "fragment words"
(frags_copy: 2 bits per trit, 0.25 bytes per weight, made per call from the base-3 rows) laid out
so that each consumer thread gets the 32 trits of its MMA fragments for one 64-wide K slice in 8
bytes, and turns each pair of trits into bf16 with one shift, one mask-and-or and one bf16x2
subtraction.

ARBD_CUDA_LARGE_M picks whether ternary_matmul uses it: "off" (the default) or "on" (bf16 x of at
least DENSE_MIN_M rows on an sm_90 GPU, K and N multiples of 8; a failed build is an error).
"""
from __future__ import annotations

import ctypes
import math

import torch

from arbd.ternary import cuda_ext, packing

SOURCE = cuda_ext.CSRC / "large_m.cu"
BLOCK_N, BLOCK_K = 128, 64   # W rows per tile, K per stage (the kernel's BN, BK)
STAGES = (3, 4)
DEFAULT_STAGES = 4

_LIB: ctypes.CDLL | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_LARGE_M", "off", ("on", "off"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_frags_copy.restype = ctypes.c_int
        lib.arbd_frags_copy.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.arbd_large_m.restype = ctypes.c_int
        lib.arbd_large_m.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p]
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


def padded_shape(n: int, K: int) -> tuple[int, int]:
    """(n_pad, k_tiles) of the fragment words of an [n, K] weight."""
    return math.ceil(n / BLOCK_N) * BLOCK_N, math.ceil(K / BLOCK_K)


def frags_reference(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The fragment words in torch (any device; the reference for tests): int32
    [n_pad / 128, k_tiles, 256, 2], indexed [tile, K slice, consumer thread c, h].

    Thread c = 128 cw + 32 w + 4 g + q holds, in word h, W row 128 tile + 64 cw + 16 w + g + 8 h; its
    pair j = 2 s + e holds trits k = 64 slice + 16 s + 2 q + 8 e and k + 1 as digits trit + 1 at bits
    2 j and 16 + 2 j. Rows past n and columns past K are zero trits (digit 1).
    """
    n = packed.shape[0]
    n_pad, k_tiles = padded_shape(n, K)
    dev = packed.device
    digits = torch.ones(n_pad, k_tiles * BLOCK_K, dtype=torch.int64, device=dev)
    digits[:n, :K] = packing.unpack_trits(packed, K).to(torch.int64) + 1
    # rows: tile, cw, w, h, g; columns: slice, s, e, q, odd
    d = digits.view(n_pad // BLOCK_N, 2, 4, 2, 8, k_tiles, 4, 2, 4, 2)
    d = d.permute(0, 5, 1, 2, 4, 8, 3, 6, 7, 9)  # tile, slice, cw, w, g, q, h, s, e, odd
    shifts = (2 * (2 * torch.arange(4, device=dev).view(4, 1, 1) + torch.arange(2, device=dev).view(1, 2, 1))
              + 16 * torch.arange(2, device=dev).view(1, 1, 2))  # [s, e, odd]: 2 j (+ 16)
    words = (d << shifts).sum(dim=(-3, -2, -1))
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.reshape(n_pad // BLOCK_N, k_tiles, 256, 2)


def frags_copy(packed: torch.Tensor, K: int) -> torch.Tensor:
    """frags_reference's layout made by one CUDA kernel (packed on an sm_90 GPU)."""
    n, kb = packed.shape
    if kb != packing.packed_cols(K):
        raise ValueError(f"packed must have {packing.packed_cols(K)} bytes per row for K={K}, got {kb}")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    n_pad, k_tiles = padded_shape(n, K)
    out = torch.empty(n_pad // BLOCK_N, k_tiles, 256, 2, dtype=torch.int32, device=packed.device)
    err = _library(packed.device).arbd_frags_copy(
        packed.data_ptr(), packed.stride(0), kb, n, K, n_pad, k_tiles, out.data_ptr(),
        torch.cuda.current_stream(packed.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA fragment-word copy failed (code {err}) for N={n} K={K}")
    return out


def large_m_matmul(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, *,
                   frags: torch.Tensor | None = None, stages: int = DEFAULT_STAGES,
                   out: torch.Tensor | None = None, _flags: int = 0) -> torch.Tensor:
    """y [M, N] bf16 = x [M, K] bf16 @ W.T, W as packed [N, ceil(K / 5)] trits and int8 exponents.

    `frags`: fragment words of packed made earlier (frags_copy); made here otherwise. The scale of
    row n is the bf16 scale that packing.decode uses, applied to the fp32 sum before rounding.
    _flags: the kernel's probe (4: no output; bench/gpu_gemm_large_m.py only).
    """
    n = packed.shape[0]
    if not fits(x, n, K) or x.shape[1] != K:
        raise ValueError(f"large_m_matmul takes bf16 x [M, {K}] on an sm_90 GPU with K % 8 == 0 and N % 8 == 0; "
                         f"got x {x.dtype} {tuple(x.shape)} on {x.device}, N={n}")
    if stages not in STAGES:
        raise ValueError(f"stages must be one of {STAGES}, got {stages}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    n_pad, k_tiles = padded_shape(n, K)
    if frags is None:
        frags = frags_copy(packed, K)
    elif (tuple(frags.shape) != (n_pad // BLOCK_N, k_tiles, 256, 2) or frags.dtype != torch.int32
          or not frags.is_contiguous()):
        raise ValueError(f"frags must be a contiguous int32 [{n_pad // BLOCK_N}, {k_tiles}, 256, 2] copy, got "
                         f"{frags.dtype} {tuple(frags.shape)}")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(1) != 1 or y.stride(0) % 8 or y.data_ptr() % 16:
        raise ValueError(f"out must be a bf16 [{m}, {n}] tensor with unit column stride, a row stride that is a "
                         f"multiple of 8 and a 16-byte-aligned start")
    table = packing.exponent_to_scale_table(x.device, torch.bfloat16)
    err = _library(x.device).arbd_large_m(
        x.data_ptr(), x.stride(0), m, K, frags.data_ptr(), n, table.data_ptr(), exponent.contiguous().data_ptr(),
        y.data_ptr(), y.stride(0), stages, cuda_ext.device_info(x.device)[1], _flags,
        torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA large-M kernel launch failed (code {err}) for M={m} N={n} K={K}")
    return y
