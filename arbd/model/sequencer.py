"""Byte-trigram sequencer: [B, T] bytes -> [B, T-2, d_model].

Position i sees bytes i, i+1, i+2: their ternary embeddings are concatenated and projected to
d_model by a ternary linear layer (seed 14's "Embedding + text sequencer" area).
"""
from __future__ import annotations

import torch
from torch import nn

from arbd.config import BYTE_VOCAB, NGRAM, ARBConfig
from arbd.ternary import TernaryEmbeddingTable, TernaryLinear


class Sequencer(nn.Module):
    def __init__(self, cfg: ARBConfig, backend: str = "torch",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.embed = TernaryEmbeddingTable(BYTE_VOCAB, cfg.byte_embed_dim, generator=generator)
        self.project = TernaryLinear(NGRAM * cfg.byte_embed_dim, cfg.d_model, backend=backend,
                                     generator=generator)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] < NGRAM:
            raise ValueError(f"Sequencer expects bytes of shape [B, T] with T >= {NGRAM}, "
                             f"got {tuple(ids.shape)}")
        e = self.embed(ids, dtype)  # [B, T, E]
        t = ids.shape[1] - NGRAM + 1
        grams = torch.cat([e[:, j:j + t] for j in range(NGRAM)], dim=-1)  # [B, T-2, 3E]
        return self.project(grams)
