"""LTI injection: a bank of fixed causal linear time-invariant filters added to the residual stream.

The seeds name "LTI injection" without describing it. Our reading (docs/decisions.md, "Modalities,
MemGram, LTI and the temporal path"): attention sees a bounded window (KV ring buffer, strided HCA
cache), so give every position a cheap summary of its whole past at several time scales. Each
filter k is an exponential moving average with a fixed decay a_k = 2 ** (-1 / half_life_k):

    y_k[t] = a_k * y_k[t-1] + (1 - a_k) * u[t],    y_k[-1] = 0        (unit DC gain)

u is a ternary down-projection of the RMS-normalised hidden state, the K filter outputs are
concatenated and a ternary up-projection adds them back:

    h' = h + W_up [y_1; ...; y_K],     u = W_down RMSNorm(h)

The filters have no trainable state (time invariance is the point: a fixed prior, nothing to
learn per position); only W_down, W_up and the norm gain are ternary and trained.

The recurrence is evaluated exactly, without a Python loop over time, by a two-level scan:
positions are cut into chunks of `chunk` steps; inside a chunk the output is a lower-triangular
Toeplitz matmul, and the chunk-end states are carried between chunks by a second triangular
matmul over chunk indices. Every weight is a non-negative power a**j (j >= 0), so nothing grows
(unlike the cumsum(a**-t x) trick, which overflows for long sequences) and the result equals the
recurrence up to float rounding. Both matrices are lower-triangular, hence the layer is causal.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from arbd.config import ARBConfig
from arbd.ternary import TernaryLinear, TernaryRMSNorm

DEFAULT_HALF_LIVES = (1.0, 4.0, 16.0, 64.0)


def ema_decays(half_lives: Sequence[float]) -> list[float]:
    """a = 2 ** (-1 / half_life): after half_life steps an input's weight has halved."""
    out = []
    for h in half_lives:
        if not h > 0:
            raise ValueError(f"half lives must be positive, got {list(half_lives)}")
        out.append(2.0 ** (-1.0 / float(h)))
    return out


def ema_bank(x: torch.Tensor, decays: Sequence[float], chunk: int = 64) -> torch.Tensor:
    """Causal EMA filters over dim 1: x [B, T, D] -> [B, T, K, D] (K = len(decays)).

    y_k[t] = a_k y_k[t-1] + (1 - a_k) x[t], zero initial state, computed by the chunked scan
    described in the module docstring. Works in x's dtype (float64 for references).
    """
    if x.dim() != 3:
        raise ValueError(f"ema_bank expects [B, T, D], got shape {tuple(x.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t, d = x.shape
    k = len(decays)
    dt, dev = x.dtype, x.device
    L = min(chunk, max(t, 1))
    c = -(-t // L)
    pad = c * L - t
    # Zero padding at the end cannot reach earlier outputs (causal); it is cut off below.
    xc = nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, c, L, d)
    a = torch.tensor(list(decays), dtype=dt, device=dev)                     # [K]
    i = torch.arange(L, device=dev)
    lag = (i[:, None] - i[None, :]).to(dt)                                   # [L, L]
    lower = (i[:, None] >= i[None, :])
    # Local Toeplitz kernel (1 - a) a^(i - j) for j <= i; a^lag is computed only where lag >= 0.
    kloc = torch.where(lower, (1 - a)[:, None, None] * a[:, None, None] ** lag.clamp(min=0),
                       torch.zeros((), dtype=dt, device=dev))                # [K, L, L]
    y_local = torch.einsum("kij,bcjd->bckid", kloc, xc)                      # [B, C, K, L, D]
    ends = y_local[:, :, :, -1]                                              # [B, C, K, D]
    # Carry: state entering chunk c is sum_{c' < c} a^(L (c - 1 - c')) * ends[c'].
    ci = torch.arange(c, device=dev)
    clag = (ci[:, None] - 1 - ci[None, :]).to(dt)
    cmask = ci[:, None] > ci[None, :]
    carry_k = torch.where(cmask, (a ** L)[:, None, None] ** clag.clamp(min=0),
                          torch.zeros((), dtype=dt, device=dev))             # [K, C, C]
    carry = torch.einsum("kce,bekd->bckd", carry_k, ends)                    # [B, C, K, D]
    # Inside chunk c the carried state decays by a^(i + 1) at local step i.
    decay_in = a[:, None] ** (i[None, :] + 1).to(dt)                         # [K, L]
    y = y_local + decay_in[None, None, :, :, None] * carry[:, :, :, None, :]
    return y.permute(0, 1, 3, 2, 4).reshape(b, c * L, k, d)[:, :t]


class LTIInjection(nn.Module):
    """h [B, T, d] -> h + W_up [EMA_1(u); ...; EMA_K(u)], u = W_down RMSNorm(h).

    Args:
        cfg: ARBConfig; uses d_model and norm_eps.
        channels: width r of u (default max(16, d_model // 16)): filters run on r channels, so
            the layer costs d*r + K*r*d ternary weights instead of K*d*d.
        half_lives: one EMA filter per entry, in positions (default 1, 4, 16, 64).
        chunk: block length of the exact chunked scan (a speed knob; results do not depend on it
            beyond float rounding).
    """

    def __init__(self, cfg: ARBConfig, *, channels: int | None = None,
                 half_lives: Sequence[float] = DEFAULT_HALF_LIVES, chunk: int = 64,
                 backend: str = "torch", generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        d = cfg.d_model
        r = max(16, d // 16) if channels is None else int(channels)
        if r < 1 or not half_lives:
            raise ValueError(f"LTIInjection needs channels >= 1 and at least one half life, "
                             f"got channels={r}, half_lives={list(half_lives)}")
        self.d_model, self.channels, self.chunk = d, r, int(chunk)
        self.half_lives = tuple(float(h) for h in half_lives)
        self.decays = ema_decays(self.half_lives)
        lin = dict(backend=backend, generator=generator, device=device)
        self.norm = TernaryRMSNorm(d, eps=cfg.norm_eps, device=device)
        self.down = TernaryLinear(d, r, **lin)
        # Small start: the injection begins as a mild perturbation of the residual stream.
        self.up = TernaryLinear(len(self.decays) * r, d, std=0.5 / math.sqrt(len(self.decays) * r), **lin)

    def filter_bank(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, T, r] -> [B, T, K * r]: the K filter outputs, concatenated filter-major."""
        # Half precision would round a^j for long half lives badly: filter in float32 at least.
        work = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
        y = ema_bank(work, self.decays, self.chunk)                 # [B, T, K, r]
        return y.flatten(2).to(u.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.d_model:
            raise ValueError(f"LTIInjection expects [B, T, {self.d_model}], got {tuple(h.shape)}")
        u = self.down(self.norm(h))
        return h + self.up(self.filter_bank(u))

    def extra_repr(self) -> str:
        return f"d={self.d_model}, channels={self.channels}, half_lives={self.half_lives}"
