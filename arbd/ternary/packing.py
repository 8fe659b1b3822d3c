"""Base-3 packing of trits and int8 log scales.

Byte layout: each row is packed on its own, 5 trits per byte, so that a single row is a
contiguous byte slice (the sparse and sharded paths fetch rows as bytes). Trit j of a row lives in
byte j // 5 as base-3 digit j % 5 (least significant first), with digit = trit + 1:

    byte = sum_{i=0..4} (t[5*b + i] + 1) * 3**i        (0..242; 243..255 are invalid)

A row of n trits takes ceil(n / 5) bytes; the tail of the last byte is padded with trit 0
(digit 1). 1.6 bits per trit, against 2 for the usual 2-bit code.

Scales: one int8 exponent E per row, scale = 2 ** (E / SCALE_K).
"""
from __future__ import annotations

import math

import torch

from arbd.config import SCALE_K, TRITS_PER_BYTE

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
_POW3_16 = _POW3.to(torch.int16)
MAX_PACKED_BYTE = 242


def _digit_table() -> torch.Tensor:
    # [256, 5] int8 trits for every byte value; invalid bytes decode to zeros and are caught by
    # validate_packed where it matters.
    b = torch.arange(256, dtype=torch.int32)
    digits = torch.stack([(b // int(p)) % 3 for p in _POW3], dim=1) - 1
    digits[MAX_PACKED_BYTE + 1:] = 0
    return digits.to(torch.int8)


_TABLE = _digit_table()
# Device copies of the constants, made once: a pageable host-to-device copy waits for the work
# already queued, so copying per call stalled the host (bench/sync_sites.sh).
_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _const_on(name: str, host: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = _ON_DEVICE.get((name, device))
    if t is None:
        t = _ON_DEVICE[(name, device)] = host.to(device)
    return t


def _table_on(device: torch.device) -> torch.Tensor:
    return _const_on("table", _TABLE, device)


def packed_cols(n: int) -> int:
    """Bytes needed for a row of n trits."""
    if n <= 0:
        raise ValueError(f"a ternary row needs at least 1 trit, got {n}")
    return math.ceil(n / TRITS_PER_BYTE)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack int trits in {-1, 0, 1} of shape [..., n] into uint8 [..., ceil(n / 5)]."""
    n = trits.shape[-1]
    nb = packed_cols(n)
    pad = nb * TRITS_PER_BYTE - n
    # int16 arithmetic: the largest byte is 242, and int16 is ~5x faster than int32 on CPU
    # (it matters when initialising 10M-row codebooks).
    digits = trits.to(torch.int16) + 1
    if pad:
        digits = torch.nn.functional.pad(digits, (0, pad), value=1)
    digits = digits.reshape(*trits.shape[:-1], nb, TRITS_PER_BYTE)
    return (digits * _const_on("pow3", _POW3_16, trits.device)).sum(-1, dtype=torch.int16).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_trits: uint8 [..., ceil(n / 5)] to int8 trits [..., n]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed trits must be uint8, got {packed.dtype}")
    nb = packed_cols(n)
    if packed.shape[-1] != nb:
        raise ValueError(
            f"packed row length {packed.shape[-1]} does not fit {n} trits: expected {nb} bytes"
        )
    digits = _table_on(packed.device)[packed.long()]  # [..., nb, 5]
    return digits.reshape(*packed.shape[:-1], nb * TRITS_PER_BYTE)[..., :n]


def validate_packed(packed: torch.Tensor, rows: int, n: int) -> None:
    """Raise ValueError unless packed is uint8 [rows, ceil(n / 5)] with every byte <= 242."""
    expected = (rows, packed_cols(n))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(
            f"packed buffer must be uint8 of shape {expected} for {rows} x {n} trits, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if packed.numel() and int(packed.max()) > MAX_PACKED_BYTE:
        raise ValueError(f"packed buffer holds bytes above {MAX_PACKED_BYTE}: not base-3 trits")


# All 256 scales, from Python's float math once. A table keeps decoding bit-identical however the
# rows are batched (torch's vectorised exp2 differs from its scalar tail by an ulp), which the
# sharded codebooks rely on.
_SCALES = torch.tensor([2.0 ** (e / SCALE_K) for e in range(-128, 128)], dtype=torch.float64)
_SCALE_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def exponent_to_scale_table(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[256]: the scale of exponent E at index E + 128 (cached per device and dtype)."""
    key = (torch.device(device), dtype)
    table = _SCALE_CACHE.get(key)
    if table is None:
        table = _SCALE_CACHE[key] = _SCALES.to(device=device, dtype=dtype)
    return table


def exponent_to_scale(exponent: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 log scale E to scale = 2 ** (E / SCALE_K), by table lookup."""
    return exponent_to_scale_table(exponent.device, dtype)[exponent.long() + 128]


def scale_to_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Nearest int8 exponent for a positive scale (saturating at the int8 range)."""
    e = torch.round(torch.log2(scale.clamp_min(1e-30).to(torch.float32)) * SCALE_K)
    return e.clamp(-128, 127).to(torch.int8)


def decode(packed: torch.Tensor, exponent: torch.Tensor, n: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of packed trits and their int8 exponents to a float matrix [rows, n]."""
    trits = unpack_trits(packed, n).to(dtype)
    return trits * exponent_to_scale(exponent, dtype).unsqueeze(-1)
