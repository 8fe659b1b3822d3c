"""A small ternary byte-level transformer LM.

Used by the foundation training run and as the common model for comparing training rules
(bench/ternary_vs_ste.py): every weight-bearing layer is built through `Layers`, so the same
architecture can be made ternary, STE (float latent) or full float.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from arbd.ternary import TernaryEmbeddingTable, TernaryLinear, TernaryRMSNorm, TernaryUpdateMixin

VOCAB = 256


@dataclass
class Layers:
    """Factories for the three kinds of weight-bearing layers."""
    linear: Callable[[int, int], nn.Module]
    norm: Callable[[int], nn.Module]
    embedding: Callable[[int, int], nn.Module]


def ternary_layers(backend: str = "torch", generator: torch.Generator | None = None) -> Layers:
    return Layers(
        linear=lambda i, o: TernaryLinear(i, o, backend=backend, generator=generator),
        norm=lambda d: TernaryRMSNorm(d),
        embedding=lambda n, d: TernaryEmbeddingTable(n, d, generator=generator),
    )


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the last dim of x [B, H, T, D] (D even); no weights."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, layers: Layers) -> None:
        super().__init__()
        if d % n_heads or (d // n_heads) % 2:
            raise ValueError(f"d_model {d} must split into {n_heads} heads of even size")
        self.n_heads = n_heads
        self.qkv = layers.linear(d, 3 * d)
        self.out = layers.linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int, layers: Layers) -> None:
        super().__init__()
        self.up = layers.linear(d, hidden)
        self.down = layers.linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Squared ReLU: sparse, cheap, and works well with low-bit weights (as in BitNet).
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, hidden: int, layers: Layers) -> None:
        super().__init__()
        self.norm1, self.attn = layers.norm(d), Attention(d, n_heads, layers)
        self.norm2, self.mlp = layers.norm(d), MLP(d, hidden, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteLM(TernaryUpdateMixin, nn.Module):
    def __init__(self, d_model: int, n_layers: int, n_heads: int, mlp_hidden: int,
                 layers: Layers | None = None) -> None:
        super().__init__()
        layers = layers or ternary_layers()
        self.embed = layers.embedding(VOCAB, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_hidden, layers) for _ in range(n_layers))
        self.norm = layers.norm(d_model)
        self.head = layers.linear(d_model, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))
