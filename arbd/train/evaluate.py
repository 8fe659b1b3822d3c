"""Held-out bits per byte."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from arbd.data import ValWindows


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, windows: ValWindows) -> float:
    """Mean next-byte cross-entropy over every scored byte of `windows`, in bits."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in windows:
        logits = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                       reduction="sum"))
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("validation set is empty: use a larger corpus or a shorter seq_len")
    return total / count / math.log(2)
