"""Output side: OutputRouter, ByteHead, VideoHead, TalkerHead (seed 19).

All heads read MoEGraph's output [B, T', d]. ByteHead predicts the next trigram (the 3 bytes
after a position's own trigram). Text-targeted forwards skip the router.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import BYTE_VOCAB, N_OUTPUT_HEADS, NGRAM, ARBConfig
from arbd.ternary import TernaryLinear

HEAD_NAMES = ("byte", "video", "talker")  # the router's output order


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class ByteHead(nn.Module):
    """Gated ternary MLP, then d -> 3 x 256 logits (one distribution per predicted byte)."""

    def __init__(self, cfg: ARBConfig, backend: str = "torch", generator=None) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.bytehead_hidden
        self.gate = TernaryLinear(d, h, backend=backend, generator=generator)
        self.up = TernaryLinear(d, h, backend=backend, generator=generator)
        self.down = TernaryLinear(h, d, backend=backend, generator=generator)
        self.out = TernaryLinear(d, NGRAM * BYTE_VOCAB, backend=backend, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.out(x).unflatten(-1, (NGRAM, BYTE_VOCAB))  # [B, T', 3, 256]


class _TwoLayerHead(nn.Module):
    def __init__(self, d: int, hidden: int, out: int, backend: str, generator) -> None:
        super().__init__()
        self.fc1 = TernaryLinear(d, hidden, backend=backend, generator=generator)
        self.fc2 = TernaryLinear(hidden, out, backend=backend, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU, not relu^2: these heads regress continuous latents, where relu^2's quadratic
        # growth turned small scale moves into exploding predictions (seen in training).
        return self.fc2(F.silu(self.fc1(x)))


class VideoHead(_TwoLayerHead):
    """d -> video latent (a patch code the video decoder consumes)."""

    def __init__(self, cfg: ARBConfig, backend: str = "torch", generator=None) -> None:
        super().__init__(cfg.d_model, cfg.video_hidden, cfg.video_out, backend, generator)


class TalkerHead(_TwoLayerHead):
    """d -> audio latent frame (what a speech codec decoder consumes)."""

    def __init__(self, cfg: ARBConfig, backend: str = "torch", generator=None) -> None:
        super().__init__(cfg.d_model, cfg.talker_hidden, cfg.talker_out, backend, generator)


class OutputRouter(nn.Module):
    """Per-position distribution over the output heads (byte, video, talker)."""

    def __init__(self, cfg: ARBConfig, backend: str = "torch", generator=None) -> None:
        super().__init__()
        self.fc1 = TernaryLinear(cfg.d_model, cfg.router_hidden, backend=backend, generator=generator)
        self.fc2 = TernaryLinear(cfg.router_hidden, N_OUTPUT_HEADS, backend=backend, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_relu2(self.fc1(x)))  # logits [B, T', 3]
