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


# Score elements ([rows, T, L]) one chunk of ledger attention holds in float32; backward holds
# about three such buffers at once (probabilities, their gradient, the scaled product).
ATTENTION_CHUNK_ELEMENTS = 1 << 23


def _f32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output (float64 stays float64): logits and their gradients keep the
    precision that a flash kernel's registers would, while 16-bit inputs still use tensor cores."""
    if a.dtype in (torch.bfloat16, torch.float16):
        if a.is_cuda:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b)


class _LedgerAttention(torch.autograd.Function):
    """softmax(q kv^T / sqrt(d)) kv for one head of dimension d = d_model, keys equal to values.

    SDPA has no flash or cuDNN kernel for a head dimension over 256; it falls back to a generic
    memory-efficient kernel whose backward took 13 ms of arb-small's step on the H100. Here the
    work is batched matmuls over chunks of batch rows. Like flash attention, only the row
    log-sum-exp is kept, and backward recomputes each chunk's probabilities from it.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, T, d = q.shape
        scale = d ** -0.5
        rows = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, T * kv.shape[1]))
        out = torch.empty_like(q)
        lse = torch.empty(B, T, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        for s in range(0, B, rows):
            e = slice(s, s + rows)
            logits = _f32_bmm(q[e], kv[e].transpose(1, 2)).mul_(scale)
            lse[e] = torch.logsumexp(logits, -1)
            out[e] = torch.bmm(logits.sub_(lse[e].unsqueeze(-1)).exp_().to(q.dtype), kv[e])
        ctx.save_for_backward(q, kv, out, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, kv, out, lse = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        g = g.contiguous()
        gq, gkv = torch.empty_like(q), torch.empty_like(kv)
        for s in range(0, q.shape[0], ctx.rows):
            e = slice(s, s + ctx.rows)
            p = _f32_bmm(q[e], kv[e].transpose(1, 2)).mul_(scale).sub_(lse[e].unsqueeze(-1)).exp_()
            # dS = P * (dP - rowsum(g * out)) / sqrt(d), the softmax backward written with out.
            dot = (g[e].to(lse.dtype) * out[e].to(lse.dtype)).sum(-1, keepdim=True)
            ds = _f32_bmm(g[e], kv[e].transpose(1, 2)).sub_(dot).mul_(p).mul_(scale).to(q.dtype)
            gq[e] = torch.bmm(ds, kv[e])
            # kv is both keys and values: its gradient is the sum of the two.
            gkv[e] = (_f32_bmm(p.to(q.dtype).transpose(1, 2), g[e])
                      + _f32_bmm(ds.transpose(1, 2), q[e])).to(kv.dtype)
        return gq, gkv


def ledger_attention(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Each of q's rows [B, T, d] attends over its batch row's ledger kv [B, L, d] (one head)."""
    if q.dim() != 3 or kv.dim() != 3 or q.shape[0] != kv.shape[0] or q.shape[2] != kv.shape[2]:
        raise ValueError(f"ledger attention wants q [B, T, d] and kv [B, L, d], got "
                         f"{tuple(q.shape)} and {tuple(kv.shape)}")
    return _LedgerAttention.apply(q.contiguous(), kv.contiguous())


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
        return ledger_attention(h, kv)
