"""Integer hashing shared by the parts that need deterministic, layout-free randomness
(the rule's stochastic rounding, MemGram's n-gram buckets)."""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2**32).

    Products stay below 2**59, so int64 never overflows; the same input gives the same output
    on every device and however the tensor is split."""
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & M32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & M32
    return x ^ (x >> 16)
