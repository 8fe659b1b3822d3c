"""The two codebooks of the seeds, built from an ARBConfig.

SharedVQ: sequencer states [.., d_model] -> ternary projection to codebook_dim -> codebook lookup
(motif ids) -> ternary vq_to_trigram projection back to d_model -> ternary RMSNorm. Logical
ternary weights: d*c + shared_vq_size*c + c*d + d, as `arbd.config.logical_ternary_weights` counts.

KGVQ: the KG / composite codebook (kgvq_size x codebook_dim) alone; the composite proposal head
that feeds it is built elsewhere.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from arbd.config import ARBConfig
from arbd.ternary import TernaryLinear, TernaryRMSNorm
from arbd.vq.codebook import TernaryVQCodebook

SHARED_VQ_SEED = 0x5A4ED
KGVQ_SEED = 0x6B67


class SharedVQOutput(NamedTuple):
    hidden: torch.Tensor      # [..., d_model]: norm(vq_to_trigram(quantized motif))
    ids: torch.Tensor         # int64 [...]: motif ids
    loss: torch.Tensor        # the codebook's codebook + beta * commitment loss
    quantized: torch.Tensor   # [..., codebook_dim]: straight-through codebook output


class SharedVQ(nn.Module):
    def __init__(self, cfg: ARBConfig, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, **codebook_kw) -> None:
        super().__init__()
        d, c = cfg.d_model, cfg.codebook_dim
        self.d_model, self.codebook_dim = d, c
        self.proj_in = TernaryLinear(d, c, generator=generator, device=device)
        codebook_kw.setdefault("hash_seed", SHARED_VQ_SEED)
        self.codebook = TernaryVQCodebook(cfg.shared_vq_size, c, candidate_count=cfg.vq_candidates,
                                          exact_max=cfg.vq_exact_max, device=device,
                                          state_layout=cfg.vq_state_layout, **codebook_kw)
        self.vq_to_trigram = TernaryLinear(c, d, generator=generator, device=device)
        self.norm = TernaryRMSNorm(d, eps=cfg.norm_eps, device=device)

    def forward(self, h: torch.Tensor) -> SharedVQOutput:
        if h.dim() == 0 or h.shape[-1] != self.d_model:
            raise ValueError(f"SharedVQ input must have last dimension {self.d_model} (d_model), "
                             f"got shape {tuple(h.shape)}")
        vq = self.codebook(self.proj_in(h))
        return SharedVQOutput(self.norm(self.vq_to_trigram(vq.quantized)), vq.ids, vq.loss,
                              vq.quantized)


class KGVQ(TernaryVQCodebook):
    """The KG VQ codebook: cfg.kgvq_size rows of cfg.codebook_dim."""

    def __init__(self, cfg: ARBConfig, *, device: torch.device | str | None = None,
                 **codebook_kw) -> None:
        codebook_kw.setdefault("hash_seed", KGVQ_SEED)
        super().__init__(cfg.kgvq_size, cfg.codebook_dim, candidate_count=cfg.vq_candidates,
                         exact_max=cfg.vq_exact_max, device=device,
                         state_layout=cfg.vq_state_layout, **codebook_kw)
