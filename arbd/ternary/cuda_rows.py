"""The CUDA touched-row update (csrc/rows.cu): rule.apply_votes on distinct rows of a matrix of
at most 64 columns (the codebooks). Two kernels:
- "record": rows of 64 trits stored as row records (state.row_records; codebooks built with
  state_layout="record"), one lane per row, every column position a compile-time constant (a
  third of the other kernel's instructions). A warp copies 32 rows' votes and records into shared
  memory coalesced, the next tile's copies in flight while it computes: 62-66% of copy bandwidth
  (device time) at 1M and 4M of 10M rows on the H100, 1.8x the four-array layout's kernel at 1M
  (bench/RESULTS.md, "Touched-row update, round 6");
- "rows": any layout and 1..64 trits, four rows to a warp, eight columns to a lane.

triton_update.apply_votes_rows takes them where they apply; ARBD_CUDA_ROWS says when:
- "auto" (default): on a CUDA device with nvcc at hand, row records at every size, other
  layouts for updates of at most AUTO_MAX_ROWS rows (where "rows" measured at least as fast as
  the Triton kernel on the H100; 4-10% slower at 1M and 4M rows: "Touched-row update, round 3").
  Without nvcc (the runtime-only Docker image) the Triton kernel runs, which is 1.1-1.5x
  slower on row records than on four arrays; if nvcc is there but the build fails, Triton runs
  after one warning: the step must not fail over a faster path;
- "on": wherever it applies (any row count), and a failed build is an error;
- "off": never (the Triton kernel).
"""
from __future__ import annotations

import ctypes
import warnings

import torch

from arbd.ternary import cuda_ext
from arbd.ternary.rule import ACC_MAX, MIN_ROW_FOR_ROW_NORM, TernaryRule
from arbd.ternary.state import record_of

SOURCE = cuda_ext.CSRC / "rows.cu"
MAX_COLS = 64
RECORD_COLS = 64   # the record kernel's row width (the codebooks')
AUTO_MAX_ROWS = 1 << 18
# Rows a warp keeps in flight, and resident blocks of 256 threads per SM: the fastest measured on
# the H100 (bench/gpu_update.py --sweep; bench/RESULTS.md, "Touched-row update, round 3").
ROWS_IN_FLIGHT, BLOCKS_PER_SM = 1, 3
# The record kernel: blocks of two warps, each warp 32 rows at a time with 45 KB of shared memory
# a block (int32 votes). Two blocks per SM took 5-15% less time than 3, 4 or 5 from 262K to 4M
# touched rows, the same at 16K, and one was 1.7x slower (bench/RESULTS.md, "Touched-row update,
# round 6"): fewer tiles in flight at once, closer together in the vote stream.
RECORD_BLOCKS_PER_SM = 2

_LIB: ctypes.CDLL | None = None
_BUILD_FAILED: str | None = None


def mode() -> str:
    return cuda_ext.switch("ARBD_CUDA_ROWS", "auto", ("auto", "on", "off"))


def _library(device: torch.device) -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = cuda_ext.load(SOURCE, device)
        lib.arbd_rows_record64.restype = ctypes.c_int
        lib.arbd_rows_record64.argtypes = (
            [ctypes.c_int] * 2 + [ctypes.c_void_p] + [ctypes.c_longlong] + [ctypes.c_void_p] * 4
            + [ctypes.c_longlong] + [ctypes.c_int] * 7 + [ctypes.c_void_p])
        lib.arbd_rows_update.restype = ctypes.c_int
        lib.arbd_rows_update.argtypes = (
            [ctypes.c_int] * 3 + [ctypes.c_void_p] * 8 + [ctypes.c_longlong] * 5
            + [ctypes.c_int] * 12 + [ctypes.c_void_p])
        _LIB = lib
    return _LIB


def usable(packed: torch.Tensor, cols: int, rows: int, record: bool = False) -> bool:
    """Whether apply_votes_rows should update `rows` rows of `cols` trits in `packed` with this
    kernel (builds it on the first call). record: the state is row records (record_base), which
    the record kernel takes at every size."""
    global _BUILD_FAILED
    if packed.device.type != "cuda" or not 1 <= cols <= MAX_COLS:
        return False
    switch = mode()
    if switch == "off" or (switch == "auto" and rows > AUTO_MAX_ROWS and not record):
        return False
    if switch == "auto":
        if _LIB is not None:   # built and loaded already: skip the PATH search (host time)
            return True
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


def check_row_layout(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                     e_accum: torch.Tensor) -> None:
    """The row kernels address row r of each buffer at r * stride(0) and its columns one apart:
    contiguous buffers or the views of one row record (state.row_records) both qualify."""
    for name, t, dim in (("packed", packed, 2), ("t_accum", t_accum, 2), ("exponent", exponent, 1),
                         ("e_accum", e_accum, 1)):
        if t.dim() != dim or (dim == 2 and t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be a {dim}-d row buffer with unit column stride, "
                             f"got shape {tuple(t.shape)} and strides {t.stride()}")


def record_base(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                e_accum: torch.Tensor) -> tuple[int, int] | None:
    """state.record_of for what the record kernel reads: 64-trit row records, 16-byte aligned
    (so its five 16-byte loads per record are too), else None."""
    found = record_of(packed, t_accum, exponent, e_accum)
    if found is None or t_accum.shape[1] != RECORD_COLS or found[0] % 16 or found[1] % 16:
        return None
    return found


def apply_votes_rows(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
                     e_accum: torch.Tensor, idx: torch.Tensor, votes: torch.Tensor,
                     e_votes: torch.Tensor | None, rule: TernaryRule, *,
                     rows_in_flight: int | None = None,
                     blocks_per_sm: int | None = None, kernel: str | None = None,
                     _memory_only: bool = False) -> torch.Tensor:
    """triton_update.apply_votes_rows's contract: rule.apply_votes on the distinct rows idx, in
    place; returns int32 [2] (trit flips, scale moves) on the device, so nothing waits for the
    host. kernel: "record" or "rows" (default: "record" where it applies). rows_in_flight
    (groups of four rows a warp loads at once: 1, 2, 4) and blocks_per_sm (of 256 threads;
    "record": of 64) override the tuned launch. _memory_only: the kernel's loads and stores
    without the rule (bench/gpu_update.py's floor; the state is left as it was)."""
    cols, nb = t_accum.shape[1], packed.shape[1]
    if not 1 <= cols <= MAX_COLS:
        raise ValueError(f"the CUDA row update takes rows of 1..{MAX_COLS} trits, got {cols}")
    check_row_layout(packed, t_accum, exponent, e_accum)
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
    sms = cuda_ext.device_info(packed.device)[1]
    stream = torch.cuda.current_stream(packed.device).cuda_stream
    record = record_base(packed, t_accum, exponent, e_accum)
    if kernel is None:
        kernel = "record" if record is not None and votes.data_ptr() % 16 == 0 else "rows"
    if kernel not in ("record", "rows"):
        raise ValueError(f"kernel must be 'record' or 'rows', got {kernel!r}")
    if kernel == "record":
        if record is None or votes.data_ptr() % 16:
            raise ValueError("the record kernel needs the views of state.row_records for 64-trit "
                             "rows and 16-byte aligned votes")
        # 64 rows a block at a time
        blocks = max(1, min(-(-u // 64), (blocks_per_sm or RECORD_BLOCKS_PER_SM) * sms))
        err = _library(packed.device).arbd_rows_record64(
            votes.element_size(), blocks, record[0], record[1],
            idx.data_ptr(), votes.data_ptr(), e_votes.data_ptr(), stats.data_ptr(), u,
            rule.threshold, rule.decay_shift, rule.saturated_cap, ACC_MAX, int(scales),
            rule.scale_threshold, int(_memory_only), stream)
        if err != 0:
            raise RuntimeError(f"CUDA record update launch failed (code {err}) for {u} rows, "
                               f"{blocks} blocks")
        return stats
    rows = rows_in_flight or ROWS_IN_FLIGHT
    # a warp takes `rows` groups of four rows at a time; blocks of eight warps
    blocks = max(1, min(-(-u // (32 * rows)), (blocks_per_sm or BLOCKS_PER_SM) * sms))
    width = votes.element_size()
    # Eight columns per load where every row's columns 8j.. are aligned for it.
    votes_vec = cols % 8 == 0 and votes.data_ptr() % min(16, 8 * width) == 0
    acc_vec = cols % 8 == 0 and t_accum.data_ptr() % 8 == 0 and t_accum.stride(0) % 8 == 0
    err = _library(packed.device).arbd_rows_update(
        width, rows, blocks, packed.data_ptr(), t_accum.data_ptr(), exponent.data_ptr(),
        e_accum.data_ptr(), idx.data_ptr(), votes.data_ptr(), e_votes.data_ptr(), stats.data_ptr(), u,
        packed.stride(0), t_accum.stride(0), exponent.stride(0), e_accum.stride(0), cols, nb,
        rule.threshold, rule.decay_shift, int(freeze), rule.saturated_cap, ACC_MAX,
        int(scales), rule.scale_threshold, int(votes_vec), int(acc_vec), int(_memory_only), stream)
    if err != 0:
        raise RuntimeError(f"CUDA row update launch failed (code {err}) for {u} rows of {cols} "
                           f"columns, {rows} rows in flight, {blocks} blocks")
    return stats
