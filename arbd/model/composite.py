"""CompositeProposalHead (seed 14, section 7): ternary proposal -> KG VQ codebook, ternary halt gate."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import ARBConfig
from arbd.ternary import TernaryLinear
from arbd.vq import KGVQ


class CompositeOutput(NamedTuple):
    ids: torch.Tensor        # int64 [B, T']: KG motif chosen per position
    quantized: torch.Tensor  # [B, T', codebook_dim] straight-through
    loss: torch.Tensor       # KG VQ codebook + commitment loss
    halt: torch.Tensor       # [B, T'] probability that the composite is complete


class CompositeProposalHead(nn.Module):
    def __init__(self, cfg: ARBConfig, backend: str = "torch", generator=None, device=None) -> None:
        super().__init__()
        self.fc1 = TernaryLinear(cfg.d_model, cfg.proposal_hidden, backend=backend,
                                 generator=generator, device=device)
        self.fc2 = TernaryLinear(cfg.proposal_hidden, cfg.codebook_dim, backend=backend,
                                 generator=generator, device=device)
        self.halt = TernaryLinear(cfg.d_model, 1, backend=backend, generator=generator, device=device)
        self.kgvq = KGVQ(cfg, device=device)

    def forward(self, h: torch.Tensor) -> CompositeOutput:
        proposal = self.fc2(F.relu(self.fc1(h)).square())
        vq = self.kgvq(proposal)
        halt = torch.sigmoid(self.halt(h).float()).squeeze(-1)
        return CompositeOutput(vq.ids, vq.quantized, vq.loss, halt)
