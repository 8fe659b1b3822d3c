"""Synthetic image, video and audio data made by code, for the multimodal pretraining mixture.

Text and code: the byte corpus. `arbd.data.load_corpus()` (no argument) gives the Python standard
library's own sources, i.e. real code, docstrings and comments, and `arbd.data.ByteBatches`
samples windows of it. Nothing else is needed for the "text" and "code" modalities.

Image, video and audio are generated here, with no download and no dependency beyond torch and
numpy. Like the byte loader, a sample is a pure function of (seed, global sample index): its
random numbers come from a torch.Generator seeded with

    key = sample_offsets([index], seed ^ MODALITY_SALT[kind], 2**63 - 1)[0]

(the byte loader's splitmix64 hash), so any rank can produce any sample, nothing depends on rank
count or history, and `ModalityBatches` uses exactly ByteBatches' sample-index layout
(step * G + micro_step * dp * b + rank * b + [0, b), G = dp * b * grad_accum): dp = 2 sees what
dp = 1 with two accumulated micro-batches sees, and resuming needs only (step, micro_step).

- image: [C, H, W] float32 in [0, 1]: a linear two-colour gradient and 1-3 anti-aliased shapes
  (disc, box, ring) in random colours.
- video: [F, C, H, W]: a static gradient background and 1-2 shapes moving at constant velocity,
  bouncing off the borders (position reflected into the frame, so motion is exact at any F).
- audio: [S] float32 in [-1, 1] at 16 kHz: 1-2 voices, each an exponential chirp with 1-4
  harmonics (amplitude 1/k) under an attack/decay envelope, plus faint noise; peak 0.9.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from arbd.data.loader import SampleCursor, sample_offsets

SAMPLE_RATE = 16_000
MODALITY_SALT = {"image": 0x1A6E_0001, "video": 0x71DE_0002, "audio": 0xA0D1_0003}
_KEY_RANGE = 2 ** 63 - 1


def sample_generator(kind: str, seed: int, index: int) -> torch.Generator:
    """The torch.Generator of sample `index` of modality `kind` under `seed`."""
    if kind not in MODALITY_SALT:
        raise ValueError(f"unknown modality {kind!r}; expected one of {sorted(MODALITY_SALT)}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    key = int(sample_offsets([int(index)], int(seed) ^ MODALITY_SALT[kind], _KEY_RANGE)[0])
    return torch.Generator().manual_seed(key)


def _u(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return h, w


# -- images and video ------------------------------------------------------------------------
def _background(g: torch.Generator, c: int, h: int, w: int) -> torch.Tensor:
    c0, c1 = _u(g, c), _u(g, c)
    theta = float(_u(g, 1, hi=2 * math.pi))
    y, x = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                          torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
    t = x * math.cos(theta) + y * math.sin(theta)
    t = (t - t.min()) / (t.max() - t.min() + 1e-12)
    return c0[:, None, None] + (c1 - c0)[:, None, None] * t


def _shape_spec(g: torch.Generator, c: int, h: int, w: int) -> dict[str, Any]:
    s = min(h, w)
    return {"kind": int(torch.randint(0, 3, (1,), generator=g)), "color": _u(g, c),
            "radius": float(_u(g, 1, lo=0.12 * s, hi=0.3 * s)), "aspect": float(_u(g, 1, lo=0.5, hi=1.5)),
            "center": (float(_u(g, 1, hi=h)), float(_u(g, 1, hi=w)))}


def _coverage(spec: dict[str, Any], cy: float, cx: float, h: int, w: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels (one-pixel soft edge)."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                          torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    r, a = spec["radius"], spec["aspect"]
    dy, dx = y - cy, x - cx
    if spec["kind"] == 0:                       # disc
        sd = torch.sqrt(dy ** 2 + dx ** 2) - r
    elif spec["kind"] == 1:                     # box of half sides r*a, r/a
        sd = torch.maximum(dx.abs() - r * a, dy.abs() - r / a)
    else:                                       # ring of width r/3
        sd = (torch.sqrt(dy ** 2 + dx ** 2) - r).abs() - r / 6
    return (0.5 - sd).clamp(0, 1)


def _paint(img: torch.Tensor, spec: dict[str, Any], cy: float, cx: float) -> torch.Tensor:
    cov = _coverage(spec, cy, cx, img.shape[1], img.shape[2])
    return img * (1 - cov) + spec["color"][:, None, None] * cov


def synthetic_image(seed: int, index: int, size: int | tuple[int, int] = 32,
                    channels: int = 3) -> torch.Tensor:
    """Image `index` under `seed`: float32 [channels, H, W] in [0, 1]."""
    h, w = _size(size)
    g = sample_generator("image", seed, index)
    img = _background(g, channels, h, w)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        spec = _shape_spec(g, channels, h, w)
        img = _paint(img, spec, *spec["center"])
    return img.to(torch.float32)


def _bounce(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect positions into [lo, hi] (a ball bouncing between two walls)."""
    span = max(hi - lo, 1e-9)
    u = torch.remainder(p - lo, 2 * span)
    return lo + span - (u - span).abs()


def synthetic_video(seed: int, index: int, frames: int = 8, size: int | tuple[int, int] = 32,
                    channels: int = 3) -> torch.Tensor:
    """Video `index` under `seed`: float32 [frames, channels, H, W] in [0, 1]."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    h, w = _size(size)
    g = sample_generator("video", seed, index)
    bg = _background(g, channels, h, w)
    t = torch.arange(frames, dtype=torch.float64)
    tracks = []
    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
        spec = _shape_spec(g, channels, h, w)
        vel = _u(g, 2, lo=-0.12, hi=0.12) * min(h, w)             # pixels per frame
        cy = _bounce(spec["center"][0] + vel[0] * t, 0.0, float(h))
        cx = _bounce(spec["center"][1] + vel[1] * t, 0.0, float(w))
        tracks.append((spec, cy, cx))
    out = []
    for f in range(frames):
        img = bg
        for spec, cy, cx in tracks:
            img = _paint(img, spec, float(cy[f]), float(cx[f]))
        out.append(img)
    return torch.stack(out).to(torch.float32)


# -- audio -----------------------------------------------------------------------------------
def synthetic_audio(seed: int, index: int, num_samples: int = 4000,
                    sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Audio clip `index` under `seed`: float32 [num_samples] in [-1, 1] (default 0.25 s at 16 kHz)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    g = sample_generator("audio", seed, index)
    n = int(num_samples)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    dur = n / sample_rate
    wave = torch.zeros(n, dtype=torch.float64)
    nyquist = sample_rate / 2
    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
        f0, f1 = (float(v) for v in torch.exp(_u(g, 2, lo=math.log(100.0), hi=math.log(1000.0))))
        onset = float(_u(g, 1, hi=0.5 * dur))
        attack, decay = float(_u(g, 1, lo=0.005, hi=0.03)), float(_u(g, 1, lo=0.05, hi=0.4))
        n_harm = int(torch.randint(1, 5, (1,), generator=g))
        # Exponential sweep f(t) = f0 * (f1/f0)^(t/dur); phase = 2 pi * integral of f.
        freq = f0 * (f1 / f0) ** (t / dur)
        phase = 2 * math.pi * torch.cumsum(freq, 0) / sample_rate + float(_u(g, 1, hi=2 * math.pi))
        local = (t - onset).clamp(min=0)
        env = torch.where(t >= onset, (local / attack).clamp(max=1) * torch.exp(-local / decay),
                          torch.zeros_like(t))
        voice = sum(torch.sin(k * phase) / k * (k * freq < nyquist) for k in range(1, n_harm + 1))
        wave = wave + env * voice
    wave = wave + 0.003 * torch.randn(n, generator=g, dtype=torch.float64)
    return (0.9 * wave / wave.abs().max().clamp(min=1e-9)).to(torch.float32)


GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "image": synthetic_image, "video": synthetic_video, "audio": synthetic_audio,
}


def synthetic_batch(kind: str, seed: int, indices: np.ndarray | list[int], **kwargs: Any) -> torch.Tensor:
    """Stack of samples with these global indices: [len(indices), *sample shape]."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown modality {kind!r}; expected one of {sorted(GENERATORS)}")
    return torch.stack([GENERATORS[kind](seed, int(i), **kwargs) for i in indices])


class ModalityBatches(SampleCursor):
    """Endless, resumable, rank-sharded batches of one synthetic modality.

    Same index layout and state as arbd.data.ByteBatches; `kwargs` go to the generator
    (e.g. size=32, frames=8, num_samples=4000). next() returns [micro_batch, *sample shape].
    """

    def __init__(self, kind: str, micro_batch: int, *, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, **kwargs: Any) -> None:
        if kind not in GENERATORS:
            raise ValueError(f"unknown modality {kind!r}; expected one of {sorted(GENERATORS)}")
        super().__init__(micro_batch, grad_accum=grad_accum, dp_rank=dp_rank, dp_size=dp_size,
                         seed=seed)
        self.kind, self.kwargs = kind, dict(kwargs)

    def batch(self, step: int, micro_step: int) -> torch.Tensor:
        return synthetic_batch(self.kind, self.seed, self.sample_indices(step, micro_step), **self.kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {**self._position_state(), "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; kind, seed and global_batch must match (mid-step: the whole split too)."""
        self._load_position(state, ["kind", "seed", "global_batch"])
