"""The CUDA small-M forwards (csrc/small_m.cu): y = x @ W.T for M <= 16 rows of 16-bit x.

Built on first use with the machine's nvcc and loaded with ctypes (cuda_ext.py). Two kernels:
- small_m_matmul reads W's packed rows as they are;
- tiled_matmul reads a tile-major copy of them (tile_major / tiled_copy), which lets every load be
  16 bytes wide and coalesced and the loads run ahead of the decode. It is the fastest small-M
  forward measured on the H100 (K = N = 7168, back-to-back calls: M = 16 in 13.8 us, 2.79x cuBLAS
  bf16, against 19.8 us for the Triton kernel; M = 1 in 9.7 us, 4.15x; bench/RESULTS.md), but the
  copy costs 0.2 bytes per weight while held and about 1 ms per 7168 x 7168 matrix to make, once
  per weight version: right for inference, where weights stay fixed, and wrong for training, where
  they change every step.

ARBD_CUDA_SMALL_M picks what ternary_matmul uses at M <= 16: "off" (the default: the Triton small-M
kernel), "on" (small_m_matmul wherever it applies) or "tiled" (tiled_matmul, each weight's copy
kept while the weight is unchanged: for inference and serving). Under "on" and "tiled" a failed
build is an error. Both kernels need Hopper (sm_90); other GPUs take the Triton kernel.
"""
from __future__ import annotations

import ctypes
import math
import weakref

import torch

from arbd.config import SCALE_K
from arbd.ternary import cuda_ext, packing

SOURCE = cuda_ext.CSRC / "small_m.cu"
MAX_M = 16
# A block covers at most 16 chunks of 16 bytes and a cluster at most 16 blocks.
MAX_CHUNKS, MAX_SPLITS = 16, 16
MAX_KB = 16 * MAX_CHUNKS * MAX_SPLITS
# (rows per warp in tiles of 16, warps per block); the kernel compiles these in.
SHAPES = ((1, 8), (2, 4), (2, 8), (4, 4), (4, 8))

_LIB: ctypes.CDLL | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_SMALL_M", "off", ("on", "off", "tiled"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_small_m.restype = ctypes.c_int
        lib.arbd_tiled_m.restype = ctypes.c_int
        lib.arbd_tiled_m.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_float,
            ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p]
        lib.arbd_small_m.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong,
            ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
            ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def _takes(x: torch.Tensor, wanted: str) -> bool:
    """Whether ARBD_CUDA_SMALL_M is `wanted` and x is 16-bit, 1..MAX_M rows, on an sm_90 GPU
    (builds the library on the first call)."""
    if (x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16)
            or not 1 <= x.shape[0] <= MAX_M or mode() != wanted):
        return False
    if cuda_ext.device_info(x.device)[0] < (9, 0):
        return False  # small_m_kernel's clusters need sm_90, and the library is built as one
    _library(x.device)  # asked for by name: a failed build is an error, not a silent fallback
    return True


def usable(x: torch.Tensor, kb: int) -> bool:
    """Whether ternary_matmul should run x against rows of kb packed bytes through small_m_matmul
    (ARBD_CUDA_SMALL_M=on)."""
    return 1 <= kb <= MAX_KB and _takes(x, "on")


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


# -- The tile-major copy and its kernel (tiled_kernel in csrc/small_m.cu) ------------------------
SUPER = 80  # trits per super-block: 4 lanes x 20 trits (five MMA steps of k = 16)


def tile_major(packed: torch.Tensor, K: int) -> torch.Tensor:
    """W's trits re-packed for tiled_kernel: int32 [tiles, pairs, 32, 4] (16 bytes per lane).

    tiles = ceil(N / 16), pairs = ceil(ceil(K / 80) / 2). Word (u, h) of lane (g, q) in pair p of
    tile t is row 16 t + g + 8 h, super-block J = 2 p + u; its byte i holds the five trits
    k = 80 J + 16 s + 4 q + i (s = 0..4) as base-3 digits (trit + 1), s the least significant.
    Rows and columns past W are zero trits. Same density as `packed` (0.2 bytes per trit, plus
    padding); built with torch, on packed's device.
    """
    n = packed.shape[0]
    tiles, supers = math.ceil(n / 16), math.ceil(K / SUPER)
    supers += supers % 2
    trits = torch.zeros(tiles * 16, supers * SUPER, dtype=torch.int8, device=packed.device)
    trits[:n, :K] = packing.unpack_trits(packed, K)
    trits = trits.view(tiles * 16, supers, 5, 4, 4).permute(0, 1, 3, 4, 2)  # row, J, q, i, s
    words = packing.pack_trits(trits).squeeze(-1).view(torch.int32)  # bytes [row, J, q, i] -> [row, J, q]
    words = words.view(tiles, 2, 8, supers // 2, 2, 4)  # t, h, g, p, u, q
    return words.permute(0, 3, 2, 5, 4, 1).contiguous().view(tiles, supers // 2, 32, 4)


def untile(tiled: torch.Tensor, n: int, K: int) -> torch.Tensor:
    """The inverse of tile_major: int8 trits [n, K] (a reference for tests)."""
    tiles, pairs = tiled.shape[:2]
    words = tiled.view(tiles, pairs, 8, 4, 2, 2).permute(0, 5, 2, 1, 4, 3)  # t, h, g, p, u, q
    raw = words.contiguous().view(torch.uint8).view(tiles * 16, 2 * pairs, 4, 4)  # row, J, q, i
    digits = packing.unpack_trits(raw.reshape(-1, 1), 5).view(tiles * 16, 2 * pairs, 4, 4, 5)
    return digits.permute(0, 1, 4, 2, 3).reshape(tiles * 16, -1)[:n, :K]  # k = 80 J + 16 s + 4 q + i


_TILED: dict[int, tuple] = {}


def tiled_copy(packed: torch.Tensor, K: int) -> torch.Tensor:
    """tile_major(packed, K), kept while `packed` lives and has not been written (same storage,
    same version counter, which the update kernels bump: triton_update._mark_written), like the
    decoded W the layers share. Costs 0.2 bytes per weight while held."""
    key = id(packed)
    hit = _TILED.get(key)
    if hit is not None and hit[0]() is packed and hit[1:3] == (packed._version, packed.data_ptr()):
        return hit[3]
    tiled = tile_major(packed, K)
    _TILED[key] = (weakref.ref(packed, lambda _, key=key: _TILED.pop(key, None)), packed._version,
                   packed.data_ptr(), tiled)
    return tiled


_TILED_VARIANTS: list[tuple[int, ...]] = []  # the library's list, read once


def tiled_variants(device: torch.device, probes: bool = False) -> list[tuple[int, ...]]:
    """The tiled kernel's compiled variants (row tiles per warp R, warps along N WN, warps along K
    WK, pairs loaded ahead D, flags FL): FL & 4 prefetches the warp's W into L2 up front; FL & 3
    = 0 computes the product, and the probes (FL & 3 = 1: no MMAs, 2: no decode, 3: neither; bench
    attribution only) leave parts out."""
    if not _TILED_VARIANTS:
        buf = (ctypes.c_int * 256)()
        count = _library(device).arbd_tiled_m_variants(buf, 256)
        _TILED_VARIANTS.extend(tuple(buf[5 * i: 5 * i + 5]) for i in range(count))
    return [v for v in _TILED_VARIANTS if probes or (v[4] & 3) == 0]


# Row tiles per warp, warps along N, warps along K, pairs ahead, flags (4: W prefetched into L2):
# the fastest or within 2% at M = 1, 8 and 16 (K = N = 7168, H100; bench/RESULTS.md "Small-M
# forward: programmatic dependent launch and an L2 prefetch of W").
DEFAULT_TILED = (2, 1, 8, 2, 4)


def tiled_usable(x: torch.Tensor) -> bool:
    """Whether ternary_matmul should take tiled_matmul for x (ARBD_CUDA_SMALL_M=tiled)."""
    return _takes(x, "tiled")


def tiled_matmul(x: torch.Tensor, tiled: torch.Tensor, exponent: torch.Tensor, n: int, K: int, *,
                 variant: tuple[int, ...] | None = None, pdl: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T with W given as tile_major(packed, K) and int8 exponents [N].

    x: bf16 or fp16 on an sm_90 GPU, 1 <= M <= 16. variant: one of tiled_variants(). pdl: launch
    with programmatic dependent launch, so that this call's weight loads overlap the end of the
    kernel before it (the kernel waits for that one to finish before it reads x or writes y)."""
    m, k = x.shape
    tiles, pairs = math.ceil(n / 16), math.ceil(math.ceil(K / SUPER) / 2)
    if not 1 <= m <= MAX_M or k != K:
        raise ValueError(f"tiled_matmul takes x [1..{MAX_M}, {K}], got {tuple(x.shape)}")
    if tuple(tiled.shape) != (tiles, pairs, 32, 4) or tiled.dtype != torch.int32 or not tiled.is_contiguous():
        raise ValueError(f"tiled must be tile_major(packed, {K}) of {n} rows: int32 {(tiles, pairs, 32, 4)}, "
                         f"got {tiled.dtype} {tuple(tiled.shape)}")
    if x.stride(1) != 1 or x.stride(0) % 4 or x.data_ptr() % 8:
        # The kernel reads x in 8-byte pieces: copy into rows padded to a multiple of 4 elements.
        xp = torch.empty(m, 4 * math.ceil(K / 4), dtype=x.dtype, device=x.device)
        xp[:, :K] = x
        x = xp
    exponent = exponent.contiguous()
    lib = _library(x.device)
    index = tiled_variants(x.device, probes=True).index(variant or DEFAULT_TILED)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n) or y.dtype != x.dtype or y.stride(1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} tensor with unit column stride")
    err = lib.arbd_tiled_m(int(x.dtype == torch.bfloat16), index, m, x.data_ptr(), x.stride(0), K,
                           tiled.data_ptr(), pairs, tiles, n, exponent.data_ptr(), 1.0 / SCALE_K,
                           y.data_ptr(), y.stride(0), int(pdl), torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA tiled small-M kernel failed (code {err}) for M={m} N={n} K={K} variant={variant}")
    return y
