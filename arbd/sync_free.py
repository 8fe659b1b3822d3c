"""Tensor helpers that do not make the host wait for the GPU.

A CUDA op whose output size depends on the data (torch.bincount sizes its output from the
largest value, nonzero and unique from the count) copies a value back and stalls the host until
the queued work is done. In a multi-GPU step every such stall also waits for the collectives
queued before it (bench/sync_sites.sh counts them by call site).
"""
from __future__ import annotations

import torch


def bin_counts(index: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n]: how often each value 0..n-1 occurs in `index` (values must lie in [0, n)).
    torch.bincount(index, minlength=n) without its readback of index.max()."""
    index = index.reshape(-1).long()
    out = torch.zeros(n, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index, torch.ones_like(index))
