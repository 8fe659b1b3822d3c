"""VAE2D sequencer: images and video into d_model tokens through a small ternary patch VAE.

The seeds' "VAE2D sidecar" turns pixels into the token stream the model reads, and its decoder
turns VideoHead outputs back into pixels. Ours is deliberately small and fully ternary:

    image [B, C, H, W] in [0, 1]
      -> map to [-1, 1], pad bottom/right to multiples of `patch` (pad value 0 = mid grey)
      -> patches [B, N, C*p*p], N = ceil(H/p) * ceil(W/p), row-major over the patch grid
      -> encoder (ternary MLP) -> mu, logvar [B, N, latent_dim]
      -> z = mu + exp(logvar / 2) * eps in training, z = mu in eval
      -> ternary projection latent_dim -> d, plus a fixed sin/cos code of (time, row, col)
      -> tokens [B, N, d]
    decoder (ternary MLP): z -> patch pixels; loss = masked MSE + kl_weight * KL(q(z|x) || N(0, I))

Padded pixels are excluded from the reconstruction loss, so odd sizes train exactly like
multiples of the patch.

Video [B, F, C, H, W]: each frame is encoded as an image (same encoder), then the compressed
temporal path groups frame latents in windows of `temporal_stride` frames and maps each window
to one token per patch with a ternary projection of the concatenated latents
(stride * latent_dim -> d). Concatenating, not averaging, keeps the order of frames inside a
window (motion) at the same token count. A last window with fewer frames repeats the last frame's
latent (video's natural padding: "nothing moved"). Tokens are time-major:
[B, ceil(F / stride) * N, d], window k's N patch tokens before window k+1's.

The position code is fixed (no weights): d is split into three equal even slices for the time
index (window index; 0 for images), the patch row and the patch column, each a sin/cos code.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import ARBConfig
from arbd.ternary import TernaryLinear

LOGVAR_MIN, LOGVAR_MAX = -8.0, 4.0  # keeps exp(logvar) finite while the ternary encoder is young


def sincos_code(pos: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Transformer-style code of integer positions: [N] -> [N, dim] (dim even)."""
    half = dim // 2
    if half == 0:
        return torch.zeros(pos.numel(), dim, dtype=dtype, device=pos.device)
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float64) / half)
    ang = pos.to(torch.float64)[:, None] * freq[None, :]
    return torch.cat([ang.sin(), ang.cos()], -1).to(dtype)


def position_code(times: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """[N] integer (time, row, col) -> [N, d]: three equal even slices, the remainder zero."""
    part = (d // 3) // 2 * 2
    out = torch.zeros(times.numel(), d, dtype=dtype, device=times.device)
    for j, p in enumerate((times, rows, cols)):
        out[:, j * part:(j + 1) * part] = sincos_code(p, part, dtype)
    return out


class _MLP(nn.Module):
    def __init__(self, i: int, h: int, o: int, **lin) -> None:
        super().__init__()
        self.fc1 = TernaryLinear(i, h, **lin)
        self.fc2 = TernaryLinear(h, o, **lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class VAE2DSequencer(nn.Module):
    """Ternary patch VAE that emits d_model tokens for images ([B, C, H, W]) and video ([B, F, C, H, W]).

    Args:
        cfg: ARBConfig; uses d_model and video_out.
        channels: image channels C (default 3).
        patch: patch side p (default 8).
        latent_dim: latent width per patch (default cfg.video_out, so a VideoHead output is a
            latent this decoder can render).
        hidden: encoder/decoder hidden width (default max(64, d_model // 4)).
        temporal_stride: frames per temporal token in the video path (default 2).
        kl_weight: weight of the KL term (mean nats per latent unit) in `loss` (default 1e-3).
        position_codes: add the fixed (time, row, col) code to the tokens (default True).
    """

    def __init__(self, cfg: ARBConfig, *, channels: int = 3, patch: int = 8,
                 latent_dim: int | None = None, hidden: int | None = None,
                 temporal_stride: int = 2, kl_weight: float = 1e-3, position_codes: bool = True,
                 backend: str = "torch", generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("patch", patch), ("temporal_stride", temporal_stride)):
            if int(v) < 1:
                raise ValueError(f"VAE2DSequencer.{name}: expected a positive int, got {v}")
        self.d_model = cfg.d_model
        self.channels, self.patch = int(channels), int(patch)
        self.latent_dim = cfg.video_out if latent_dim is None else int(latent_dim)
        self.hidden = max(64, cfg.d_model // 4) if hidden is None else int(hidden)
        self.temporal_stride = int(temporal_stride)
        self.kl_weight = float(kl_weight)
        self.position_codes = bool(position_codes)
        pix = self.channels * self.patch ** 2
        self.patch_dim = pix
        lin = dict(backend=backend, generator=generator, device=device)
        self.encoder = _MLP(pix, self.hidden, 2 * self.latent_dim, **lin)
        self.decoder = _MLP(self.latent_dim, self.hidden, pix, **lin)
        self.proj = TernaryLinear(self.latent_dim, self.d_model, **lin)
        self.temporal_proj = TernaryLinear(self.temporal_stride * self.latent_dim, self.d_model, **lin)

    # -- shapes ------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"VAE2DSequencer expects images [B, C={self.channels}, H, W], "
                             f"got shape {tuple(images.shape)}")
        if images.shape[1] != self.channels:
            raise ValueError(f"VAE2DSequencer expects {self.channels} channels, got {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")
        if images.shape[2] < 1 or images.shape[3] < 1 or images.shape[0] < 1:
            raise ValueError(f"VAE2DSequencer expects non-empty images, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"VAE2DSequencer expects float pixels in [0, 1], got {images.dtype}")

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5:
            raise ValueError(f"VAE2DSequencer expects video [B, F, C={self.channels}, H, W], "
                             f"got shape {tuple(video.shape)}")
        if video.shape[1] < 1:
            raise ValueError(f"VAE2DSequencer expects at least 1 frame, got {video.shape[1]}")
        self._check_images(video.flatten(0, 1))

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an h x w image: ceil(h / p), ceil(w / p)."""
        return -(-h // self.patch), -(-w // self.patch)

    def patchify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, H, W] in [0, 1] -> (patches [B, N, C*p*p] in [-1, 1], mask [N, C*p*p]; 1 = real pixel)."""
        self._check_images(images)
        b, c, h, w = images.shape
        gh, gw = self.grid(h, w)
        p = self.patch
        pad = (0, gw * p - w, 0, gh * p - h)
        x = F.pad(images * 2 - 1, pad)
        m = F.pad(torch.ones(1, c, h, w, dtype=images.dtype, device=images.device), pad)

        def cut(t: torch.Tensor) -> torch.Tensor:  # [n, C, gh*p, gw*p] -> [n, gh*gw, C*p*p]
            t = t.reshape(t.shape[0], c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
            return t.reshape(t.shape[0], gh * gw, c * p * p)
        return cut(x), cut(m)[0]

    def unpatchify(self, patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of patchify: [B, N, C*p*p] in [-1, 1] -> [B, C, h, w] in [0, 1] (padding cut off)."""
        gh, gw = self.grid(h, w)
        p, c = self.patch, self.channels
        if patches.shape[-2:] != (gh * gw, c * p * p):
            raise ValueError(f"unpatchify expects [B, {gh * gw}, {c * p * p}] for {h}x{w}, "
                             f"got {tuple(patches.shape)}")
        x = patches.reshape(-1, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, gh * p, gw * p)
        return (x[:, :, :h, :w] + 1) / 2

    # -- VAE ---------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, H, W] -> (mu, logvar), each [B, N, latent_dim]; logvar clamped to [-8, 4]."""
        patches, _ = self.patchify(images)
        mu, logvar = self.encoder(patches).chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterisation in training mode; the mean in eval mode (deterministic tokens)."""
        if not self.training:
            return mu
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Latents [B, N, latent_dim] of an h x w image -> pixels [B, C, h, w] in [0, 1] (unclamped)."""
        return self.unpatchify(self.decoder(z), h, w)

    def _codes(self, n_time: int, gh: int, gw: int, dtype: torch.dtype, device) -> torch.Tensor:
        t = torch.arange(n_time, device=device).repeat_interleave(gh * gw)
        r = torch.arange(gh, device=device).repeat_interleave(gw).repeat(n_time)
        c = torch.arange(gw, device=device).repeat(gh * n_time)
        return position_code(t, r, c, self.d_model, dtype)

    # -- tokens ------------------------------------------------------------------------------
    def image_tokens(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, ceil(H/p) * ceil(W/p), d]."""
        mu, logvar = self.encode(images)
        tok = self.proj(self.sample(mu, logvar, generator))
        if self.position_codes:
            tok = tok + self._codes(1, *self.grid(*images.shape[-2:]), tok.dtype, tok.device)
        return tok

    def temporal_windows(self, z: torch.Tensor) -> torch.Tensor:
        """Frame latents [B, F, N, L] -> windows [B, ceil(F / s), N, s * L] (last frame repeated to fill)."""
        b, f, n, l = z.shape
        s = self.temporal_stride
        fw = -(-f // s)
        if fw * s > f:
            z = torch.cat([z, z[:, -1:].expand(b, fw * s - f, n, l)], 1)
        return z.reshape(b, fw, s, n, l).permute(0, 1, 3, 2, 4).reshape(b, fw, n, s * l)

    def video_tokens(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, F, C, H, W] -> [B, ceil(F / stride) * N, d], time-major."""
        self._check_video(video)
        b, f = video.shape[:2]
        mu, logvar = self.encode(video.flatten(0, 1))
        z = self.sample(mu, logvar, generator).unflatten(0, (b, f))    # [B, F, N, L]
        win = self.temporal_windows(z)                                 # [B, F', N, s*L]
        tok = self.temporal_proj(win)
        if self.position_codes:
            tok = tok + self._codes(win.shape[1], *self.grid(*video.shape[-2:]), tok.dtype,
                                    tok.device).unflatten(0, win.shape[1:3])
        return tok.flatten(1, 2)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> [B, N, d]; video [B, F, C, H, W] -> [B, ceil(F/stride) * N, d]."""
        if x.dim() == 5:
            return self.video_tokens(x, generator)
        return self.image_tokens(x, generator)

    def loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction + KL for images [B, C, H, W] or video [B, F, C, H, W] (frames independent).

        recon: MSE in [0, 1] pixel units over real (unpadded) pixels; kl: mean over patches and
        latent units of KL(N(mu, exp(logvar)) || N(0, 1)); loss = recon + kl_weight * kl.
        """
        if images.dim() == 5:
            self._check_video(images)
            images = images.flatten(0, 1)
        patches, mask = self.patchify(images)
        mu, logvar = self.encoder(patches).chunk(2, dim=-1)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        rec = self.decoder(self.sample(mu, logvar, generator))
        # Both in [-1, 1]; /4 converts squared error to [0, 1] pixel units.
        se = (rec - patches).square() * mask / 4
        recon = se.sum() / (mask.sum() * patches.shape[0])
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
        return {"loss": recon + self.kl_weight * kl, "recon": recon, "kl": kl}

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, patch={self.patch}, latent={self.latent_dim}, "
                f"hidden={self.hidden}, d={self.d_model}, temporal_stride={self.temporal_stride}")
