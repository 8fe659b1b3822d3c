"""MemGram: a hashed byte n-gram memory added to the hidden state.

The seeds name MemGram without describing it. Our reading (docs/decisions.md, "Modalities,
MemGram, LTI and the temporal path"): a large ternary table addressed by hashes of the bytes just
seen, i.e. static n-gram knowledge looked up in O(1) instead of recomputed by attention and FFNs
(the idea of hash embeddings and of DeepSeek's Engram memory).

Alignment with the trigram Sequencer: h has T' = T - 2 positions and position i covers bytes
i, i+1, i+2. For each order n in `orders`, position i reads the n-gram that *ends* at byte i+2,
bytes i+3-n .. i+2, so it never sees a byte after i+2 (causal in the sequencer's sense). Bytes
before the sequence start are the pad symbol 256.

Hash (deterministic, platform independent, all in int64 with values kept below 2**32):
    mix(x)   = the 32-bit finaliser x ^= x >> 16; x *= 0x045D9F3B; ... (three rounds, below)
    salt     = mix(0x9E3779B9 * (16 * n + j + 1) mod 2**32)      for order n, hash function j
    s        = salt; for each byte c of the n-gram, oldest first: s = mix((s * 0x01000193 + c + 1) mod 2**32)
    row      = s mod table_size
Each order has `num_hashes` independent hash functions; their rows are summed (two colliding
n-grams rarely collide under every function, so the sum still tells them apart), the per-order
sums are concatenated, projected to d by a ternary layer and scaled by a per-position ternary
gate that reads both the hidden state and the memory (the model can ignore a useless lookup):

    m_n = sum_j E[row(n, j)] / sqrt(num_hashes)
    v   = W_out [m_n1; m_n2; ...]
    g   = sigmoid(w_gate . [RMSNorm(h); RMSNorm(v)])
    h'  = h + g * v

The table is a sparse TernaryEmbeddingTable: a step decodes and updates only the looked-up rows.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import nn

from arbd.config import BYTE_VOCAB, NGRAM, ARBConfig
from arbd.hashing import M32, mix32
from arbd.ternary import TernaryEmbeddingTable, TernaryLinear, TernaryRMSNorm
from arbd.ternary.layers import id_range

PAD_BYTE = BYTE_VOCAB  # stands for "before the start of the sequence"
DEFAULT_ORDERS = (2, 3, 4)


@functools.lru_cache(maxsize=64)
def _salts(orders: tuple[int, ...], num_hashes: int) -> tuple[int, ...]:
    return tuple(int(mix32(torch.tensor((0x9E3779B9 * (16 * n + j + 1)) & M32)))
                 for n in orders for j in range(num_hashes))


def ngram_hash_ids(ids: torch.Tensor, orders: Sequence[int], num_hashes: int,
                   table_size: int) -> torch.Tensor:
    """Table rows for every sequencer position: [B, T] bytes -> int64 [B, T-2, len(orders), num_hashes].

    All (order, hash function) pairs are hashed together as lanes of one tensor: at step k every
    lane reads the same byte column (byte i+3-max_n+k for position i), and a lane of order n joins
    at step max_n - n, keeping its salt until then. Same values as hashing each order and function
    on its own, in about a quarter of the kernel launches (the training step is launch-bound)."""
    b, t = ids.shape
    tp = t - NGRAM + 1
    orders = tuple(int(n) for n in orders)
    max_n = max(orders)
    # Left pad so that position i's n-gram (ending at byte i+2) always exists.
    padded = torch.cat([torch.full((b, max_n - 1), PAD_BYTE, dtype=torch.long, device=ids.device),
                        ids.long()], 1)
    s = torch.tensor(_salts(orders, num_hashes), dtype=torch.long, device=ids.device)
    joins = torch.tensor([max_n - n for n in orders for _ in range(num_hashes)], device=ids.device)
    s = s.expand(b, tp, s.numel())
    for k in range(max_n):
        byte = padded[:, NGRAM - 1 + k:NGRAM - 1 + k + tp, None]
        new = mix32((s * 0x01000193 + byte + 1) & M32)
        s = new if k >= max_n - min(orders) else torch.where(joins <= k, new, s)
    return (s % table_size).view(b, tp, len(orders), num_hashes)


class MemGram(nn.Module):
    """Hashed n-gram memory: bytes [B, T] and h [B, T-2, d] -> h' [B, T-2, d].

    Args:
        cfg: ARBConfig; uses d_model and norm_eps.
        table_size: rows of the ternary memory table (default 64 * d_model).
        mem_dim: width of a table row (default max(16, d_model // 64)).
        orders: n-gram lengths looked up at each position (default 2, 3, 4; any n >= 1, bytes
            before the start of the sequence read as the pad symbol 256).
        num_hashes: hash functions per order (default 2).
    """

    def __init__(self, cfg: ARBConfig, *, table_size: int | None = None, mem_dim: int | None = None,
                 orders: Sequence[int] = DEFAULT_ORDERS, num_hashes: int = 2,
                 backend: str = "torch", generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        d = cfg.d_model
        self.table_size = 64 * d if table_size is None else int(table_size)
        self.mem_dim = max(16, d // 64) if mem_dim is None else int(mem_dim)
        self.orders = tuple(int(n) for n in orders)
        self.num_hashes = int(num_hashes)
        if not self.orders or min(self.orders) < 1 or self.num_hashes < 1 or self.table_size < 1:
            raise ValueError(f"MemGram needs orders >= 1, num_hashes >= 1 and table_size >= 1, got "
                             f"orders={self.orders}, num_hashes={self.num_hashes}, "
                             f"table_size={self.table_size}")
        self.d_model = d
        lin = dict(backend=backend, generator=generator, device=device)
        self.table = TernaryEmbeddingTable(self.table_size, self.mem_dim, sparse=True,
                                           generator=generator, device=device)
        k = len(self.orders) * self.mem_dim
        self.out = TernaryLinear(k, d, std=0.5 / math.sqrt(k), **lin)
        self.norm_h = TernaryRMSNorm(d, eps=cfg.norm_eps, device=device)
        self.norm_v = TernaryRMSNorm(d, eps=cfg.norm_eps, device=device)
        self.gate = TernaryLinear(2 * d, 1, **lin)

    def hash_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows looked up: int64 [B, T-2, len(orders), num_hashes]."""
        return ngram_hash_ids(ids, self.orders, self.num_hashes, self.table_size)

    def memory(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projected memory v [B, T-2, d] (before the gate)."""
        rows = self.hash_ids(ids)                                    # [B, T', O, H]
        e = self.table(rows, dtype)                                  # [B, T', O, H, m]
        m = e.sum(-2) / math.sqrt(self.num_hashes)                   # [B, T', O, m]
        return self.out(m.flatten(-2))

    def forward(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] < NGRAM:
            raise ValueError(f"MemGram expects bytes of shape [B, T] with T >= {NGRAM}, "
                             f"got {tuple(ids.shape)}")
        want = (ids.shape[0], ids.shape[1] - NGRAM + 1, self.d_model)
        if tuple(h.shape) != want:
            raise ValueError(f"MemGram expects h of shape [B, T-2, d] = {want} for bytes "
                             f"{tuple(ids.shape)}, got {tuple(h.shape)}")
        lo, hi = id_range(ids)
        if lo < 0 or hi >= BYTE_VOCAB:
            raise ValueError(f"MemGram expects byte ids in [0, {BYTE_VOCAB}), got range [{lo}, {hi}]")
        v = self.memory(ids, h.dtype)
        g = torch.sigmoid(self.gate(torch.cat([self.norm_h(h), self.norm_v(v)], -1)))
        return h + g * v

    def extra_repr(self) -> str:
        return (f"table={self.table_size}x{self.mem_dim}, orders={self.orders}, "
                f"num_hashes={self.num_hashes}, d={self.d_model}")
