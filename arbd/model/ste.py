"""Baseline layer factories for ByteLM: BitNet-b1.58-style STE and plain float.

These exist to measure the ternary accumulator rule against the usual ways of training
(bench/ternary_vs_ste.py). Both keep fp32 `nn.Parameter`s and are trained by a torch optimizer.

STE (straight-through estimator), as in BitNet b1.58 for weights:
    gamma = mean(|W|)                        per tensor, recomputed every forward
    W_q   = gamma * clip(round(W / (gamma + eps)), -1, 1)
    y     = x @ (W + (W_q - W).detach()).T   forward sees W_q, gradient flows to W unchanged

Choices (docs/decisions.md, "The ternary update rule"):
- The same tensors are ternary as in the ternary model: every linear, the embedding table and
  the output head. BitNet keeps embedding and head in high precision; we do not, so that (a) and
  (b) differ only in how they are trained, not in what is quantised.
- Activations are not quantised (the ternary model does not quantise them either).
- RMSNorm gains stay fp32 parameters, as in BitNet (they are a negligible share of weights).
  The ternary model's gains are ternary with an int8 log scale; that is a (small) handicap of (a).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from arbd.model.byte_lm import Layers

_EPS = 1e-5


def absmean_ternary(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 weight quantiser with a straight-through gradient."""
    gamma = w.abs().mean()
    q = (w / (gamma + _EPS)).round().clamp(-1, 1) * gamma
    return w + (q - w).detach()


class STELinear(nn.Module):
    """Linear layer without bias whose fp32 latent weight is ternarised in forward (STE)."""

    def __init__(self, in_features: int, out_features: int, *, quantize: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.quantize = in_features, out_features, quantize
        w = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = absmean_ternary(self.weight) if self.quantize else self.weight
        return F.linear(x, w.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, ternary_ste={self.quantize}"


class STEEmbedding(nn.Module):
    """Embedding table (std 1 rows, as the ternary table) with optional STE ternarisation."""

    def __init__(self, num_embeddings: int, dim: int, *, quantize: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.dim, self.quantize = num_embeddings, dim, quantize
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim, generator=generator))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = absmean_ternary(self.weight) if self.quantize else self.weight
        return F.embedding(ids.long(), w.to(dtype))


class RMSNorm(nn.Module):
    """RMSNorm with an fp32 gain (initialised to 1)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.gain.to(x.dtype)


def ste_layers(generator: torch.Generator | None = None) -> Layers:
    """BitNet-b1.58-style STE: fp32 latent weights, absmean ternary in forward, float gains."""
    return Layers(
        linear=lambda i, o: STELinear(i, o, quantize=True, generator=generator),
        norm=lambda d: RMSNorm(d),
        embedding=lambda n, d: STEEmbedding(n, d, quantize=True, generator=generator),
    )


def float_layers(generator: torch.Generator | None = None) -> Layers:
    """Full precision: the same shapes and initialisation, nothing quantised."""
    return Layers(
        linear=lambda i, o: STELinear(i, o, quantize=False, generator=generator),
        norm=lambda d: RMSNorm(d),
        embedding=lambda n, d: STEEmbedding(n, d, quantize=False, generator=generator),
    )


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (linears, embedding), none on gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
