"""KV ledger and ContextAttentionScheduler (seed 14, section 5).

The ledger remembers recent byte ids per batch row (a ring of `kv_ledger_len`): it is seeded
with the prompt when empty and every forward appends the bytes the model predicted. The
scheduler embeds the ledger with a ternary table and lets each position attend over it; the
result is injected into MoEGraph, whose output feeds the router and the heads.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from arbd.config import BYTE_VOCAB
from arbd.ternary import TernaryEmbeddingTable


class KVLedger:
    """Ring buffer of byte ids per batch row. Runtime state: not part of the weights."""

    def __init__(self, length: int) -> None:
        if length <= 0:
            raise ValueError(f"ledger length must be positive, got {length}")
        self.length = length
        self.ids: torch.Tensor | None = None   # [B, length] int64
        self.count = 0                         # entries written so far (<= length visible)

    def reset(self) -> None:
        self.ids, self.count = None, 0

    @property
    def empty(self) -> bool:
        return self.count == 0

    def _ensure(self, batch: int, device: torch.device) -> None:
        if self.ids is None or self.ids.shape[0] != batch:
            # A new batch shape means new sequences: the old memory is not theirs.
            self.ids = torch.zeros(batch, self.length, dtype=torch.long, device=device)
            self.count = 0

    def seed(self, prompt: torch.Tensor) -> None:
        """Fill an empty ledger with prompt bytes [B, T]; does nothing if it holds entries."""
        self._ensure(prompt.shape[0], prompt.device)
        if self.empty:
            self.append(prompt)

    @torch.no_grad()
    def append(self, ids: torch.Tensor) -> None:
        """Append byte ids [B, n] (oldest entries are overwritten when full)."""
        self._ensure(ids.shape[0], ids.device)
        n = ids.shape[1]
        pos = (self.count + torch.arange(n, device=ids.device)) % self.length
        self.ids[:, pos] = ids.long()   # later writes win on wrap, as a ring should
        self.count += n

    def view(self) -> torch.Tensor | None:
        """Visible entries oldest first, [B, min(count, length)], or None when empty."""
        if self.empty:
            return None
        n = min(self.count, self.length)
        start = (self.count - n) % self.length
        order = (start + torch.arange(n, device=self.ids.device)) % self.length
        return self.ids[:, order]


class ContextAttentionScheduler(nn.Module):
    """Each position attends over the ledger's embedded bytes; returns a context [B, T, d]."""

    def __init__(self, d_model: int, generator=None) -> None:
        super().__init__()
        self.embed = TernaryEmbeddingTable(BYTE_VOCAB, d_model, std=1.0 / math.sqrt(d_model),
                                           generator=generator)

    def forward(self, h: torch.Tensor, ledger_ids: torch.Tensor | None) -> torch.Tensor:
        if ledger_ids is None:
            return torch.zeros_like(h)
        if ledger_ids.shape[0] != h.shape[0]:
            raise ValueError(f"ledger has {ledger_ids.shape[0]} rows, the batch has {h.shape[0]}")
        kv = self.embed(ledger_ids, h.dtype)                       # [B, L, d]
        return nn.functional.scaled_dot_product_attention(h.unsqueeze(1), kv.unsqueeze(1),
                                                          kv.unsqueeze(1)).squeeze(1)
