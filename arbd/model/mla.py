"""Multi-head latent attention (DeepSeek style) with a latent KV ring cache and the HCA cache.

Shapes (per layer; H_l = n_local_heads, the heads this rank owns under tensor parallelism):

    h      = attn_norm(x)                                          [B, T, d_model]
    q      = wq_b(q_norm(wq_a(h)))  -> [q_nope | q_pe] per head     [B, T, H_l, nope + rope]
    c, kpe = wkv_a(h)                -> latent c [kv_lora_rank], one RoPE key kpe [rope] shared by heads
    c      = kv_norm(c)
    k, v   = wkv_b(c)                -> [k_nope | v] per head       [B, N, H_l, nope + v_dim]
    k      = [k_nope | rope(kpe)]    (rope(kpe) broadcast over heads)
    out    = wo(softmax(q k^T / sqrt(nope + rope)) v)               [B, T, d_model]

Row layout contract (the tensor-parallel step relies on it): wq_b and wkv_b output rows are grouped
by head, head-major ([head0: nope|rope, head1: ...] and [head0: nope|v, ...]); wo input columns are
[head0: v, head1: ...]. Splitting those rows/columns into contiguous head ranges and setting
`n_local_heads` is all TP needs; wq_a, wkv_a and the norms (latent and RoPE key) are replicated.

Which keys a query at absolute position t sees (the same rule in training and generation):
  * exact keys: positions in the window [max(origin, t - W + 1), t], W = kv_cache_len;
  * with HCA, compressed keys: block j covers positions origin + [j*s, (j+1)*s), s = hca_stride;
    block j is visible iff it starts before the window (origin + j*s < window start) and it is one
    of the hca_cache_len most recent such blocks. Blocks are aligned to the sequence origin (0 for
    a cache). Requiring W >= s makes every visible block end at or before t: no future position.
A compressed entry is the mean of its block's normalized latents (hca_kv_cache) and the mean of its
block's roped keys (hca_pe_cache). wkv_b is linear and bias-free, so the entry's key and value are
exactly the means of the block's per-head keys and values, and its logit is the mean of the
block's logits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import ARBConfig
from arbd.ternary import ops
from arbd.ternary.layers import TernaryLinear, TernaryRMSNorm


# ---------------------------------------------------------------------------------------------
# Position helpers.


# cos / sin tables by (first position, length, channels, theta, dtype, device). Training calls
# rope twice per layer with the same positions 0..T-1; the tables cost ~10 kernel launches each,
# and launches, not arithmetic, set the pace of a training step (bench/profile_step.py). Only
# positions the caller states to be a plain range (`start`) are cached.
_ROPE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_ROPE_CACHE_MAX = 64


def _rope_tables(positions: torch.Tensor, d: int, theta: float, dtype: torch.dtype,
                 start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    def build() -> tuple[torch.Tensor, torch.Tensor]:
        inv = theta ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float64) / d)
        ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, D/2]
        return ang.cos().to(dtype), ang.sin().to(dtype)

    if start is None:
        return build()
    key = (start, positions.numel(), d, theta, dtype, positions.device)
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        if len(_ROPE_CACHE) >= _ROPE_CACHE_MAX:
            _ROPE_CACHE.clear()
        tables = _ROPE_CACHE[key] = build()
    return tables


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, *,
               start: int | None = None) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x [B, T, ..., D] by positions[t] * theta^(-2i/D).

    Interleaved pairs, as DeepSeek's complex-number form. Angles are computed in float64 so large
    absolute positions keep their precision, then cast to the compute dtype. `start`: the caller
    promises positions == arange(start, start + T), which lets the cos / sin tables be reused.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even channel count, got {d}")
    if positions.shape != (x.shape[1],):
        raise ValueError(f"RoPE positions must have shape ({x.shape[1]},), got {tuple(positions.shape)}")
    cdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    cos, sin = _rope_tables(positions, d, theta, cdt, start)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (d // 2,)  # broadcast over batch and heads
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.to(cdt)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


# Where rope_tail runs the fused kernel (arbd/model/triton_rope.py): auto | on | off, as
# ops.use_fused_kernel reads them.
FUSED_ROPE = os.environ.get("ARBD_FUSED_ROPE", "auto")


def rope_tail(x: torch.Tensor, nope: int, positions: torch.Tensor, theta: float, *,
              start: int | None = None) -> torch.Tensor:
    """x [B, T, (H,) nope + rope]: the first `nope` channels as they are, the last `rope` rotated
    as apply_rope does, in a new tensor (the query's torch.cat, without its copy and launches)."""
    rope = x.shape[-1] - nope
    if (ops.use_fused_kernel(FUSED_ROPE, x) and rope > 0 and rope % 2 == 0 and nope % 2 == 0
            and positions.shape == (x.shape[1],)):
        from arbd.model.triton_rope import RopeTailFn
        cos, sin = _rope_tables(positions, rope, theta, torch.float32, start)
        return RopeTailFn.apply(x, cos, sin, nope)
    rotated = apply_rope(x[..., nope:], positions, theta, start=start)
    return rotated if nope == 0 else torch.cat([x[..., :nope], rotated], dim=-1)


def crop_to_common(kv: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a latent cache [B, n, *] and its positional cache [B, m, *] to the same key count.

    Both caches grow at the end (newest entry last), so the common part is the trailing
    min(n, m) entries of each. Cropping, never broadcasting: a length-1 positional cache must not
    be stretched over n latents (seed 19's shape-drift bug).
    """
    if kv.dim() != 3 or pe.dim() != 3:
        raise ValueError(f"caches must be [batch, keys, features]; got kv {tuple(kv.shape)}, "
                         f"pe {tuple(pe.shape)}")
    if kv.shape[0] != pe.shape[0]:
        raise ValueError(f"latent and positional caches disagree on batch: kv has {kv.shape[0]}, "
                         f"pe has {pe.shape[0]}")
    n = min(kv.shape[1], pe.shape[1])
    return kv[:, kv.shape[1] - n:], pe[:, pe.shape[1] - n:]


def visible_mask(q_pos: torch.Tensor, key_pos: torch.Tensor, key_block: torch.Tensor, *,
                 origin: int, window: int, stride: int, hca_len: int) -> torch.Tensor:
    """Bool [Tq, N]: which keys each query may attend to (the rule in the module docstring).

    key_pos [N] is the absolute position of an exact key, -1 otherwise (compressed or empty slot);
    key_block [N] is the block index of a compressed key, -1 otherwise.
    """
    ws = torch.clamp(q_pos - window + 1, min=origin)[:, None]  # first exact position per query
    qp = q_pos[:, None]
    exact = (key_pos[None] >= 0) & (key_pos[None] >= ws) & (key_pos[None] <= qp)
    n_elig = torch.div(ws - origin + stride - 1, stride, rounding_mode="floor")  # blocks before ws
    kb = key_block[None]
    comp = (kb >= 0) & (kb < n_elig) & (kb >= n_elig - hca_len)
    return exact | comp


def _blocks_before(first_window_pos: int, origin: int, stride: int) -> int:
    """Number of whole blocks that start before `first_window_pos` (= blocks compressed so far)."""
    return max(0, -(-(first_window_pos - origin) // stride))


# ---------------------------------------------------------------------------------------------
# The cache.


@dataclass
class MLACache:
    """Generation state of one MLA layer for a batch of sequences advancing in lockstep.

    Holds latents, not per-head K/V, so it is identical on every tensor-parallel rank and costs
    (kv_lora_rank + qk_rope_dim) values per position. Contents are detached: gradients do not
    cross calls (train long contexts with the full-context path instead).
    """
    kv_cache: torch.Tensor      # [B, W, kv_lora_rank] ring; normalized latent c_kv, slot = pos % W
    pe_cache: torch.Tensor      # [B, W, qk_rope_dim]  ring; RoPE key after rotation
    pos: torch.Tensor           # [W] int64, absolute position held by each slot, -1 = empty
    hca_kv_cache: torch.Tensor  # [B, n, kv_lora_rank], n <= hca_cache_len, oldest block first
    hca_pe_cache: torch.Tensor  # [B, n, qk_rope_dim], the matching block keys (explicit, never re-strided)
    next_pos: int = 0           # absolute position of the next token
    n_blocks: int = 0           # blocks compressed so far; the HCA entries are the last n of them

    @classmethod
    def empty(cls, cfg: ARBConfig, batch: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> MLACache:
        if batch <= 0:
            raise ValueError(f"cache batch must be positive, got {batch}")
        w, r, p = cfg.kv_cache_len, cfg.kv_lora_rank, cfg.qk_rope_dim
        z = dict(dtype=dtype, device=device)
        return cls(kv_cache=torch.zeros(batch, w, r, **z), pe_cache=torch.zeros(batch, w, p, **z),
                   pos=torch.full((w,), -1, dtype=torch.long, device=device),
                   hca_kv_cache=torch.zeros(batch, 0, r, **z), hca_pe_cache=torch.zeros(batch, 0, p, **z))

    @property
    def batch_size(self) -> int:
        return self.kv_cache.shape[0]

    @property
    def window(self) -> int:
        return self.kv_cache.shape[1]


# ---------------------------------------------------------------------------------------------
# The layer.


class MLA(nn.Module):
    """One attention block: pre-norm (attn_norm) + multi-head latent attention + output projection.

    Returns the attention branch only; the caller adds the residual (so the row-parallel wo
    all-reduce stays the last operation of the branch under tensor parallelism).
    """

    def __init__(self, cfg: ARBConfig, layer_idx: int = 0, backend: str = "torch", *,
                 use_hca: bool = True, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.kv_cache_len < cfg.hca_stride:
            # A block that starts before the window must end inside it (causality of HCA).
            raise ValueError(f"kv_cache_len must be >= hca_stride ({cfg.hca_stride}), "
                             f"got {cfg.kv_cache_len}")
        self.cfg, self.layer_idx, self.use_hca = cfg, layer_idx, use_hca
        self.n_heads = cfg.n_heads
        self.n_local_heads = cfg.n_heads  # the TP step shrinks this with wq_b / wkv_b / wo
        self.qk_nope_dim, self.qk_rope_dim, self.v_head_dim = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
        self.qk_head_dim = cfg.qk_nope_dim + cfg.qk_rope_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = 1.0 / math.sqrt(self.qk_head_dim)
        lin = dict(backend=backend, generator=generator, device=device)
        d, h = cfg.d_model, cfg.n_heads
        self.attn_norm = TernaryRMSNorm(d, cfg.norm_eps, device=device)
        self.wq_a = TernaryLinear(d, cfg.q_lora_rank, **lin)
        self.q_norm = TernaryRMSNorm(cfg.q_lora_rank, cfg.norm_eps, device=device)
        self.wq_b = TernaryLinear(cfg.q_lora_rank, h * self.qk_head_dim, **lin)
        self.wkv_a = TernaryLinear(d, cfg.kv_lora_rank + cfg.qk_rope_dim, **lin)
        self.kv_norm = TernaryRMSNorm(cfg.kv_lora_rank, cfg.norm_eps, device=device)
        self.wkv_b = TernaryLinear(cfg.kv_lora_rank, h * (cfg.qk_nope_dim + cfg.v_head_dim), **lin)
        self.wo = TernaryLinear(h * cfg.v_head_dim, d, **lin)
        # The RoPE key is shared by all heads; tensor parallelism hooks here to sum its
        # gradient over the head shards (arbd/parallel/tensor_parallel.py).
        self.rope_key = nn.Identity()

    def new_cache(self, batch: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> MLACache:
        return MLACache.empty(self.cfg, batch, dtype=dtype, device=device)

    # -- checks ------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, cache: MLACache | None, start_pos: int | None) -> int:
        d = self.cfg.d_model
        if x.dim() != 3:
            raise ValueError(f"MLA expects x of shape [batch, seq, {d}], got shape {tuple(x.shape)}")
        if x.shape[-1] != d:
            raise ValueError(f"MLA expects {d} input features (d_model), got {x.shape[-1]}")
        if x.shape[1] == 0:
            raise ValueError("MLA expects at least one position, got seq length 0")
        if cache is None:
            start = 0 if start_pos is None else int(start_pos)
            if start < 0:
                raise ValueError(f"start_pos must be >= 0, got {start}")
            return start
        if cache.batch_size != x.shape[0]:
            raise ValueError(f"cache holds batch {cache.batch_size}, x has batch {x.shape[0]}")
        if cache.kv_cache.dtype != x.dtype:
            raise ValueError(f"cache dtype {cache.kv_cache.dtype} does not match x dtype {x.dtype}")
        w, r, p = self.cfg.kv_cache_len, self.kv_lora_rank, self.qk_rope_dim
        want = {"kv_cache": (x.shape[0], w, r), "pe_cache": (x.shape[0], w, p), "pos": (w,)}
        for name, shape in want.items():
            got = tuple(getattr(cache, name).shape)
            if got != shape:
                raise ValueError(f"cache.{name}: expected shape {shape}, got {got}")
        for name, feat in (("hca_kv_cache", r), ("hca_pe_cache", p)):
            t = getattr(cache, name)
            if t.dim() != 3 or t.shape[0] != x.shape[0] or t.shape[2] != feat:
                raise ValueError(f"cache.{name}: expected shape ({x.shape[0]}, n, {feat}), "
                                 f"got {tuple(t.shape)}")
        if start_pos is not None and int(start_pos) != cache.next_pos:
            # The ring and the HCA blocks assume contiguous appends.
            raise ValueError(f"start_pos {start_pos} does not continue the cache "
                             f"(expected {cache.next_pos})")
        want_blocks = self._n_blocks(cache.next_pos - 1, origin=0) if self.use_hca else 0
        if cache.n_blocks != want_blocks:
            raise ValueError(f"cache.n_blocks: expected {want_blocks} after {cache.next_pos} "
                             f"positions (use_hca={self.use_hca}), got {cache.n_blocks}")
        return cache.next_pos

    def _n_blocks(self, last_pos: int, origin: int) -> int:
        """Blocks that must be compressed once position `last_pos` has been seen."""
        return _blocks_before(max(origin, last_pos - self.cfg.kv_cache_len + 1), origin, self.cfg.hca_stride)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: MLACache | None = None,
                start_pos: int | None = None) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        Without a cache: the whole sequence at positions start_pos.. (default 0), causal, with the
        sliding window and HCA blocks once T exceeds kv_cache_len. With a cache: continues it
        (start_pos, if given, must equal cache.next_pos), attends over [HCA entries, ring, x],
        then appends x to the cache in place.
        """
        start = self._check(x, cache, start_pos)
        b, t, _ = x.shape
        hl, nope, rope = self.n_local_heads, self.qk_nope_dim, self.qk_rope_dim
        positions = torch.arange(start, start + t, device=x.device)

        h = self.attn_norm(x)
        q = self.wq_b(self.q_norm(self.wq_a(h))).view(b, t, hl, self.qk_head_dim)
        q = rope_tail(q, nope, positions, self.cfg.rope_theta, start=start)
        c_kv, k_pe = self.wkv_a(h).split([self.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_pe = self.rope_key(rope_tail(k_pe, 0, positions, self.cfg.rope_theta, start=start))

        if cache is None and t <= self.cfg.kv_cache_len:
            # Everything fits in the window: plain causal attention, no mask tensor.
            return self.wo(self._attend(q, c_kv, k_pe, None))
        lat, pe, mask = self._keys(c_kv, k_pe, positions, cache, start)
        return self.wo(self._attend(q, lat, pe, mask))

    def _keys(self, c_kv: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor,
              cache: MLACache | None, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Assemble [compressed keys, exact keys] and their visibility mask; update the cache."""
        cfg, t = self.cfg, c_kv.shape[1]
        w, s, dev = cfg.kv_cache_len, cfg.hca_stride, c_kv.device
        if cache is None:
            origin, first = start, start
            ex_kv, ex_pe, ex_pos = c_kv, k_pe, positions
            old_kv, old_pe, old_blocks = c_kv[:, :0], k_pe[:, :0], 0
        else:
            # The ring holds [start - W, start); the oldest of those is kept for block building.
            origin, first = 0, max(0, start - w)
            slots = torch.arange(first, start, device=dev) % w
            ex_kv = torch.cat([cache.kv_cache[:, slots], c_kv], dim=1)
            ex_pe = torch.cat([cache.pe_cache[:, slots], k_pe], dim=1)
            ex_pos = torch.cat([cache.pos[slots], positions])
            old_kv, old_pe = crop_to_common(cache.hca_kv_cache, cache.hca_pe_cache)
            old_blocks = cache.n_blocks

        # Compress the blocks that start before the last query's window (each exactly once).
        n_blocks = self._n_blocks(start + t - 1, origin) if self.use_hca else 0
        new = n_blocks - old_blocks
        if new > 0:
            i0 = origin + old_blocks * s - first  # index of the first new block in the exact keys
            new_kv = ex_kv[:, i0:i0 + new * s].unflatten(1, (new, s)).mean(2)
            new_pe = ex_pe[:, i0:i0 + new * s].unflatten(1, (new, s)).mean(2)
            comp_kv, comp_pe = torch.cat([old_kv, new_kv], 1), torch.cat([old_pe, new_pe], 1)
        else:
            comp_kv, comp_pe = old_kv, old_pe
        nc = comp_kv.shape[1]
        blocks = torch.arange(n_blocks - nc, n_blocks, device=dev)

        lat, pe = torch.cat([comp_kv, ex_kv], 1), torch.cat([comp_pe, ex_pe], 1)
        none_c = torch.full((nc,), -1, dtype=torch.long, device=dev)
        none_e = torch.full((ex_pos.numel(),), -1, dtype=torch.long, device=dev)
        mask = visible_mask(positions, torch.cat([none_c, ex_pos]), torch.cat([blocks, none_e]),
                            origin=origin, window=w, stride=s, hca_len=cfg.hca_cache_len)

        if cache is not None:
            with torch.no_grad():
                m = min(t, w)
                slots = positions[t - m:] % w
                cache.kv_cache[:, slots] = c_kv[:, t - m:].detach()
                cache.pe_cache[:, slots] = k_pe[:, t - m:].detach()
                cache.pos[slots] = positions[t - m:]
                keep = min(nc, cfg.hca_cache_len)
                cache.hca_kv_cache = comp_kv[:, nc - keep:].detach().clone()
                cache.hca_pe_cache = comp_pe[:, nc - keep:].detach().clone()
                cache.n_blocks, cache.next_pos = n_blocks, start + t
        return lat, pe, mask

    def _attend(self, q: torch.Tensor, lat: torch.Tensor, pe: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, T, H_l, nope+rope]; keys as latents lat [B, N, kv_rank] and RoPE keys pe [B, N, rope]."""
        if lat.shape[1] != pe.shape[1] or (mask is not None and mask.shape[-1] != lat.shape[1]):
            # Guard of the crop contract: every key has exactly one latent and one positional key.
            raise ValueError(f"key count mismatch: {lat.shape[1]} latents, {pe.shape[1]} RoPE keys, "
                             f"mask over {None if mask is None else mask.shape[-1]}")
        b, n = lat.shape[:2]
        hl, nope, vd = self.n_local_heads, self.qk_nope_dim, self.v_head_dim
        k_nope, v = self.wkv_b(lat).view(b, n, hl, nope + vd).split([nope, vd], dim=-1)
        k = torch.cat([k_nope, pe[:, :, None].expand(b, n, hl, self.qk_rope_dim)], dim=-1)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[1], hl * vd)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layer={self.layer_idx}, heads={self.n_local_heads}/{self.n_heads}, "
                f"window={c.kv_cache_len}, hca={'on' if self.use_hca else 'off'} "
                f"(stride {c.hca_stride}, {c.hca_cache_len} entries)")
