"""The CUDA touched-row update (csrc/rows.cu): rule.apply_votes on distinct rows of a matrix of
at most 64 columns (the codebooks), four rows to a warp.

triton_update.apply_votes_rows takes it where it applies; ARBD_CUDA_ROWS says when:
- "auto" (default): on a CUDA device with nvcc at hand, for updates of at most AUTO_MAX_ROWS
  rows, where it measured at least as fast as the Triton kernel on the H100 (16K touched rows of
  the 10M codebook: 0.055-0.089 against 0.108-0.121 ms; a tie at 262K). At 1M and 4M rows it was
  4-10% slower (bench/RESULTS.md, "Touched-row update, round 3"). Without nvcc (the
  runtime-only Docker image) the Triton kernel runs; if nvcc is there but the build fails, it
  runs after one warning: the step must not fail over a faster path;
- "on": wherever it applies (any row count), and a failed build is an error;
- "off": never (the Triton kernel).

Both kernels sit within 6-15% of the floor of this access pattern (the same loads and stores
without the rule), which is what keeps them short of the 50%-of-copy-bandwidth goal: each touched
row also reads and writes a whole 32-byte sector for each of its two 1-byte fields.
"""
from __future__ import annotations

import ctypes
import warnings

import torch

from arbd.ternary import cuda_ext
from arbd.ternary.rule import ACC_MAX, MIN_ROW_FOR_ROW_NORM, TernaryRule

SOURCE = cuda_ext.CSRC / "rows.cu"
MAX_COLS = 64
AUTO_MAX_ROWS = 1 << 18
# Rows a warp keeps in flight, and resident blocks of 256 threads per SM: the fastest measured on
# the H100 (bench/gpu_update.py --sweep; bench/RESULTS.md, "Touched-row update, round 3").
ROWS_IN_FLIGHT, BLOCKS_PER_SM = 1, 3

_LIB: ctypes.CDLL | None = None
_BUILD_FAILED: str | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_ROWS", "auto", ("auto", "on", "off"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_rows_update.restype = ctypes.c_int
        lib.arbd_rows_update.argtypes = (
            [ctypes.c_int] * 3 + [ctypes.c_void_p] * 8 + [ctypes.c_longlong] + [ctypes.c_int] * 12
            + [ctypes.c_void_p])
        _LIB = lib
    return _LIB


def usable(packed: torch.Tensor, cols: int, rows: int) -> bool:
    """Whether apply_votes_rows should update `rows` rows of `cols` trits in `packed` with this
    kernel (builds it on the first call)."""
    global _BUILD_FAILED
    if packed.device.type != "cuda" or not 1 <= cols <= MAX_COLS:
        return False
    switch = mode()
    if switch == "off" or (switch == "auto" and rows > AUTO_MAX_ROWS):
        return False
    if switch == "auto":
        if _BUILD_FAILED is not None:
            return False
        if cuda_ext.nvcc() is None:  # a runtime-only image (docker/): Triton, without a word
            _BUILD_FAILED = "nvcc not found"
            return False
        try:
            _library(packed.device)
        except (RuntimeError, OSError) as err:
            _BUILD_FAILED = str(err)
            warnings.warn(f"the CUDA touched-row update could not be built ({str(err)[:300]}); "
                          "the Triton kernel runs instead (ARBD_CUDA_ROWS=off silences this)")
            return False
        return True
    _library(packed.device)  # "on": a failed build is an error
    return True


def apply_votes_rows(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                     e_accum: torch.Tensor, idx: torch.Tensor, votes: torch.Tensor,
                     e_votes: torch.Tensor | None, rule: TernaryRule, *,
                     rows_in_flight: int | None = None,
                     blocks_per_sm: int | None = None, _memory_only: bool = False) -> torch.Tensor:
    """triton_update.apply_votes_rows's contract: rule.apply_votes on the distinct rows idx, in
    place; returns int32 [2] (trit flips, scale moves) on the device, so nothing waits for the
    host. rows_in_flight (groups of four rows a warp loads at once: 1, 2, 4) and blocks_per_sm
    (of 256 threads) override the tuned launch. _memory_only: the kernel's loads and stores
    without the rule (bench/gpu_update.py's floor; the state is left as it was)."""
    cols, nb = t_accum.shape[1], packed.shape[1]
    if not 1 <= cols <= MAX_COLS:
        raise ValueError(f"the CUDA row update takes rows of 1..{MAX_COLS} trits, got {cols}")
    for name, t in (("packed", packed), ("t_accum", t_accum), ("exponent", exponent),
                    ("e_accum", e_accum)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the CUDA row update")
    stats = torch.zeros(2, dtype=torch.int32, device=packed.device)
    u = idx.numel()
    if u == 0:
        return stats
    idx = idx.reshape(-1).to(torch.int64).contiguous()
    if votes.dtype not in (torch.int8, torch.int16, torch.int32):
        votes = votes.to(torch.int32)
    votes = votes.contiguous()
    scales = bool(rule.learn_scales and e_votes is not None)
    freeze = bool(rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM)
    e_votes = e_votes.reshape(-1).to(torch.int32).contiguous() if scales else stats
    rows = rows_in_flight or ROWS_IN_FLIGHT
    sms = cuda_ext.device_info(packed.device)[1]
    # a warp takes `rows` groups of four rows at a time; blocks of eight warps
    blocks = max(1, min(-(-u // (32 * rows)), (blocks_per_sm or BLOCKS_PER_SM) * sms))
    width = votes.element_size()
    # Eight columns per load where every row's columns 8j.. are aligned for it.
    votes_vec = cols % 8 == 0 and votes.data_ptr() % min(16, 8 * width) == 0
    acc_vec = cols % 8 == 0 and t_accum.data_ptr() % 8 == 0
    err = _library(packed.device).arbd_rows_update(
        width, rows, blocks, packed.data_ptr(), t_accum.data_ptr(), exponent.data_ptr(),
        e_accum.data_ptr(), idx.data_ptr(), votes.data_ptr(), e_votes.data_ptr(), stats.data_ptr(), u,
        cols, nb, rule.threshold, rule.decay_shift, int(freeze), rule.saturated_cap, ACC_MAX,
        int(scales), rule.scale_threshold, int(votes_vec), int(acc_vec), int(_memory_only),
        torch.cuda.current_stream(packed.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"CUDA row update launch failed (code {err}) for {u} rows of {cols} "
                           f"columns, {rows} rows in flight, {blocks} blocks")
    return stats
