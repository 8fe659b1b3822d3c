"""Audio sequencer: waveform [B, S] -> frame tokens [B, N, d], and next-frame targets for the TalkerHead.

    wave [B, S] (float, about [-1, 1], sample_rate Hz)
      -> frames [B, N, frame_len], hop `hop`, N = 1 + ceil((S - frame_len) / hop); the tail is
         zero padded so the last frame is whole (S must be >= frame_len)
      -> features: the raw frame and its log-mel energies (fixed Hann window, FFT and HTK mel
         filterbank: no weights)
      -> ternary MLP -> latent [B, N, latent_dim] -> ternary RMSNorm -> ternary projection to d

The raw samples keep phase and fine structure; the log-mel half gives the encoder a
shift-invariant view of the spectrum that one ternary layer on raw samples learns slowly.

`frame_targets` gives what a TalkerHead (d -> talker_out) regresses at frame t: the next frame's
representation, [B, N - 1, D] aligned with frames 0 .. N-2:
- kind="latent" (D = latent_dim = talker_out by default): the encoder's normalised latent of
  frame t+1, detached (stop-gradient). The RMSNorm fixes the target's scale, so it cannot shrink
  to zero; its content moves with the encoder, so pair it with a loss that trains the encoder
  elsewhere (the main model's loss through the tokens) or freeze the encoder.
- kind="logmel" (D = n_mels): the fixed log-mel of frame t+1; cannot collapse, needs a head with
  talker_out == n_mels.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import ARBConfig
from arbd.ternary import TernaryLinear, TernaryRMSNorm

LOG_FLOOR = 1e-5   # added to mel energies before the log (about -115 dB of a full-scale sine's power)
LOG_SCALE = 0.25   # brings log-mel (about -11.5 .. +4) to the scale of the raw samples


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """HTK-mel triangular filters [n_freqs, n_mels] over FFT bins 0 .. sample_rate / 2."""
    def hz_to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    # Always on the CPU, even under a meta/cuda default device: the caller moves the result.
    cpu = dict(dtype=torch.float64, device="cpu")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, **cpu)
    top = hz_to_mel(torch.tensor(sample_rate / 2, **cpu))
    pts = mel_to_hz(torch.linspace(0, float(top), n_mels + 2, **cpu))
    lo, mid, hi = pts[:-2], pts[1:-1], pts[2:]
    up = (freqs[:, None] - lo[None]) / (mid - lo)[None]
    down = (hi[None] - freqs[:, None]) / (hi - mid)[None]
    return torch.clamp(torch.minimum(up, down), min=0).to(torch.float32)


class AudioSequencer(nn.Module):
    """Ternary frame encoder: [B, S] waveform -> [B, N, d].

    Args:
        cfg: ARBConfig; uses d_model and talker_out.
        frame_len: samples per frame (default 400 = 25 ms at 16 kHz).
        hop: samples between frame starts (default 160 = 10 ms).
        n_mels: log-mel bands in the features (default min(64, talker_out)).
        latent_dim: frame latent width (default cfg.talker_out, the TalkerHead's output width).
        hidden: encoder hidden width (default max(64, d_model // 4)).
        sample_rate: Hz, for the mel scale only (default 16000).
    """

    def __init__(self, cfg: ARBConfig, *, frame_len: int = 400, hop: int = 160,
                 n_mels: int | None = None, latent_dim: int | None = None, hidden: int | None = None,
                 sample_rate: int = 16_000, backend: str = "torch",
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.frame_len, self.hop, self.sample_rate = int(frame_len), int(hop), int(sample_rate)
        self.n_mels = min(64, cfg.talker_out) if n_mels is None else int(n_mels)
        self.latent_dim = cfg.talker_out if latent_dim is None else int(latent_dim)
        self.hidden = max(64, cfg.d_model // 4) if hidden is None else int(hidden)
        for name, v in (("frame_len", self.frame_len), ("hop", self.hop), ("n_mels", self.n_mels),
                        ("latent_dim", self.latent_dim), ("sample_rate", self.sample_rate)):
            if v < 1:
                raise ValueError(f"AudioSequencer.{name}: expected a positive int, got {v}")
        self.d_model = cfg.d_model
        self.n_fft = 1 << max(0, math.ceil(math.log2(self.frame_len)))
        # Fixed signal processing, derived from the arguments: buffers, not state (not saved).
        # Built on the CPU and moved (building a window directly on "meta" takes seconds).
        win = torch.hann_window(self.frame_len, periodic=True, device="cpu")
        fb = mel_filterbank(self.n_fft // 2 + 1, self.n_mels, self.sample_rate)
        self.register_buffer("window", win if device is None else win.to(device), persistent=False)
        self.register_buffer("mel_fb", fb if device is None else fb.to(device), persistent=False)
        lin = dict(backend=backend, generator=generator, device=device)
        self.fc1 = TernaryLinear(self.frame_len + self.n_mels, self.hidden, **lin)
        self.fc2 = TernaryLinear(self.hidden, self.latent_dim, **lin)
        self.norm = TernaryRMSNorm(self.latent_dim, eps=cfg.norm_eps, device=device)
        self.proj = TernaryLinear(self.latent_dim, self.d_model, **lin)

    def num_frames(self, num_samples: int) -> int:
        """N = 1 + ceil((S - frame_len) / hop) for S >= frame_len."""
        return 1 + -(-(num_samples - self.frame_len) // self.hop)

    def frames(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, N, frame_len], the tail zero padded to a whole frame."""
        if wave.dim() != 2:
            raise ValueError(f"AudioSequencer expects a waveform [B, S], got shape {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise ValueError(f"AudioSequencer expects float samples, got {wave.dtype}")
        s = wave.shape[1]
        if s < self.frame_len:
            raise ValueError(f"AudioSequencer needs at least frame_len = {self.frame_len} samples, "
                             f"got {s}")
        n = self.num_frames(s)
        wave = F.pad(wave, (0, (n - 1) * self.hop + self.frame_len - s))
        return wave.unfold(1, self.frame_len, self.hop)

    def logmel(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, N, frame_len] -> natural-log mel energies [B, N, n_mels] (float32 or float64)."""
        dt = torch.float64 if frames.dtype == torch.float64 else torch.float32
        spec = torch.fft.rfft(frames.to(dt) * self.window.to(dt), n=self.n_fft).abs().square()
        return torch.log(spec @ self.mel_fb.to(dt) + LOG_FLOOR)

    def latent(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] -> normalised frame latents [B, N, latent_dim]."""
        fr = self.frames(wave)
        feats = torch.cat([fr, (self.logmel(fr) * LOG_SCALE).to(fr.dtype)], -1)
        return self.norm(self.fc2(F.silu(self.fc1(feats))))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, N, d]."""
        return self.proj(self.latent(wave))

    def frame_targets(self, wave: torch.Tensor, kind: str = "latent") -> torch.Tensor:
        """Next-frame targets [B, N - 1, D]: row t describes frame t+1 (see the module docstring)."""
        if kind not in ("latent", "logmel"):
            raise ValueError(f"frame_targets kind must be 'latent' or 'logmel', got {kind!r}")
        fr = self.frames(wave)
        if fr.shape[1] < 2:
            raise ValueError(f"next-frame targets need at least 2 frames, i.e. >= "
                             f"{self.frame_len + 1} samples, got {wave.shape[1]}")
        with torch.no_grad():
            tgt = self.latent(wave) if kind == "latent" else self.logmel(fr).to(wave.dtype)
        return tgt[:, 1:].detach()

    def extra_repr(self) -> str:
        return (f"frame_len={self.frame_len}, hop={self.hop}, n_mels={self.n_mels}, "
                f"latent={self.latent_dim}, hidden={self.hidden}, d={self.d_model}")
