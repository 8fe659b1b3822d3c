"""Step schedules: a multiplier in [floor, 1] per step.

The same shape drives AdamW's learning rate (baselines) and the ternary rule's evidence rate
(`model.ternary_rate_mult`): the ternary model has no learning rate, but the rate at which
evidence reaches the accumulators plays its part (how many steps of agreeing gradient move a trit).
"""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, *, warmup: int = 0, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps (from 1/warmup), then cosine from 1 down to `floor`
    at step `total`. `step` counts from 1."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if warmup > 0 and step <= warmup:
        return step / warmup
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
