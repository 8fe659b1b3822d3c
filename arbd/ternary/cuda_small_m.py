"""The CUDA small-M forward (csrc/small_m.cu): y = x @ W.T for M <= 16 rows of 16-bit x.

Built on first use with the machine's nvcc and loaded with ctypes (cuda_ext.py).

ARBD_CUDA_SMALL_M picks whether ternary_matmul uses it: "off" (the default: the Triton small-M
kernel, which measured faster at M = 16 on the H100, 19.7 against 20.9 us; bench/RESULTS.md) or
"on" (this kernel wherever it applies; a failed build is then an error). It stays as the base of
the next attempt at the M = 16 target (see docs/decisions.md).

The kernel needs Hopper (sm_90: thread-block clusters add the split-K partial sums, in a fixed
order, so results are deterministic) and rows of at most MAX_KB packed bytes; other GPUs and
shapes take the Triton kernel.
"""
from __future__ import annotations

import ctypes
import math

import torch

from arbd.config import SCALE_K
from arbd.ternary import cuda_ext

SOURCE = cuda_ext.CSRC / "small_m.cu"
MAX_M = 16
# A block covers at most 16 chunks of 16 bytes and a cluster at most 16 blocks.
MAX_CHUNKS, MAX_SPLITS = 16, 16
MAX_KB = 16 * MAX_CHUNKS * MAX_SPLITS
# (rows per warp in tiles of 16, warps per block); the kernel compiles these in.
SHAPES = ((1, 8), (2, 4), (2, 8), (4, 4), (4, 8))

_LIB: ctypes.CDLL | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_SMALL_M", "off", ("on", "off"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_small_m.restype = ctypes.c_int
        lib.arbd_small_m.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong,
            ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
            ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def usable(x: torch.Tensor, kb: int) -> bool:
    """Whether ternary_matmul should run x against rows of kb packed bytes through this kernel
    (builds it on the first call)."""
    if (x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16)
            or not 1 <= x.shape[0] <= MAX_M or not 1 <= kb <= MAX_KB or mode() == "off"):
        return False
    if cuda_ext.device_info(x.device)[0] < (9, 0):
        return False  # thread-block clusters and distributed shared memory need sm_90
    _library(x.device)  # asked for by name: a failed build is an error, not a silent fallback
    return True


def smem_bytes(r: int, warps: int, chunks: int, m: int) -> int:
    """Shared memory of one block (as the kernel's launch computes it): copies of the 16-byte blocks
    covering each packed row's range (an odd count per row), and the activations in fragment order."""
    row_words = max(4 * ((chunks + 1) | 1), 16)  # the region also holds 16 fp32 sums per row later
    return 16 * r * warps * row_words * 4 + chunks * 32 * (1 if m <= 8 else 2) * 40


def default_shape(n: int, kb: int, device: torch.device) -> tuple[int, int, int]:
    """(rows per warp, warps, splits): blocks of 128 rows, about three blocks per SM (H100, M = 16,
    K = N = 7168: 56 row ranges x 7 splits was the fastest shape measured, bench/RESULTS.md)."""
    r, warps = 1, 8
    blocks_n = math.ceil(n / (16 * r * warps))
    return r, warps, max(1, 3 * cuda_ext.device_info(device)[1] // blocks_n)


def small_m_matmul(x: torch.Tensor, packed: torch.Tensor, exponent: torch.Tensor, K: int, *,
                   shape: tuple[int, int, int] | None = None, out: torch.Tensor | None = None,
                   _flags: int = 0) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T with W as packed [N, ceil(K / 5)] uint8 trits and int8 exponents.

    x: bf16 or fp16 on a CUDA device, 1 <= M <= 16, unit stride along K. shape: (rows per warp,
    warps, splits) to override default_shape. The caller checks shapes (ternary_matmul does).
    _flags: the kernel's phase switches, for bench/gpu_gemm_small_m.py's attribution only.
    """
    m, k = x.shape
    n, kb = packed.shape
    if not 1 <= m <= MAX_M or k != K:
        raise ValueError(f"small_m_matmul takes x [1..{MAX_M}, {K}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    packed = packed.contiguous()
    exponent = exponent.contiguous()
    r, warps, splits = shape or default_shape(n, kb, x.device)
    if (r, warps) not in SHAPES:
        raise ValueError(f"(rows per warp, warps) = {(r, warps)} is not compiled in; one of {SHAPES}")
    if not 1 <= kb <= MAX_KB:
        raise ValueError(f"rows of {kb} packed bytes: the CUDA small-M kernel takes at most {MAX_KB}")
    total = math.ceil(kb / 16)
    splits = max(min(splits, total, MAX_SPLITS), math.ceil(total / MAX_CHUNKS))
    chunks = math.ceil(total / splits)
    limit = cuda_ext.device_info(x.device)[2]
    while smem_bytes(r, warps, chunks, m) > limit and splits < MAX_SPLITS:  # split further
        splits += 1
        chunks = math.ceil(total / splits)
    splits = math.ceil(total / chunks)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} tensor with unit column stride")
    lib = _library(x.device)
    err = lib.arbd_small_m(
        int(x.dtype == torch.bfloat16), r, warps, m, x.data_ptr(), x.stride(0), K, packed.data_ptr(), n, kb,
        exponent.data_ptr(), 1.0 / SCALE_K, y.data_ptr(), y.stride(0), splits, chunks, _flags,
        torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA small-M kernel launch failed (code {err}) for M={m} N={n} K={K} "
                           f"shape={(r, warps, splits)}")
    return y
