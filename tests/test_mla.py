"""MLA attention: weight count, shapes, gradients, caches (ring, HCA) and an fp64 reference."""
import math

import pytest
import torch

from arbd.config import get_preset, mla_layer_weights
from arbd.model.mla import MLA, MLACache, crop_to_common
from arbd.ternary import TernaryLinear, TernaryMatrix

TINY = get_preset("arb-tiny")
# A short window so sequences of ~20 positions wrap the ring and fill the HCA cache:
# W = 8 exact positions, blocks of s = 4, at most C = 3 compressed entries.
SMALL_WIN = TINY.with_overrides(kv_cache_len=8, hca_cache_len=3)
F64 = torch.float64


def make_layer(cfg=SMALL_WIN, seed=0, use_hca=True):
    """A layer whose trits and row exponents are all random (norm gains included), so that head
    layout, per-row scales and gains are all exercised by the comparisons below."""
    g = torch.Generator().manual_seed(seed)
    layer = MLA(cfg, use_hca=use_hca, generator=g)
    for m in layer.modules():
        if isinstance(m, TernaryMatrix):
            trits = torch.randint(-1, 2, (m.rows, m.cols), generator=g, dtype=torch.int8)
            base = -8 * int(math.log2(m.cols)) if m.cols > 1 else 0  # ~1/sqrt(cols) scale
            exp = base + torch.randint(-6, 7, (m.rows,), generator=g)
            m.set_trits(trits, exp)
    return layer


def ternary_matrices(module):
    return [m for m in module.modules() if isinstance(m, TernaryMatrix)]


# ---------------------------------------------------------------------------------------------
# Independent float64 reference: decoded weights, explicit per-query key sets, no module code.


def reference(layer, x, *, window=None, stride=None, hca_len=None, use_hca=True, start=0):
    cfg = layer.cfg
    window = cfg.kv_cache_len if window is None else window
    stride = cfg.hca_stride if stride is None else stride
    hca_len = cfg.hca_cache_len if hca_len is None else hca_len
    H, nope, rope, vd, r = cfg.n_heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    dec = lambda lin: lin.weight.decode(F64)  # noqa: E731
    gain = lambda norm: norm.gain.decode(F64).reshape(-1)  # noqa: E731

    def rms(v, g):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * g

    def rot(v, pos):  # v [..., T, D]: complex rotation of pairs (2i, 2i+1)
        vc = torch.view_as_complex(v.reshape(*v.shape[:-1], -1, 2).contiguous())
        freqs = cfg.rope_theta ** (-torch.arange(0, rope, 2, dtype=F64) / rope)
        ph = torch.polar(torch.ones(len(pos), rope // 2, dtype=F64), pos[:, None].to(F64) * freqs)
        return torch.view_as_real(vc * ph).flatten(-2)

    x = x.to(F64)
    B, T, _ = x.shape
    pos = torch.arange(start, start + T)
    h = rms(x, gain(layer.attn_norm))
    q = rms(h @ dec(layer.wq_a).T, gain(layer.q_norm)) @ dec(layer.wq_b).T
    q = q.view(B, T, H, nope + rope).permute(0, 2, 1, 3)  # [B, H, T, .]
    q = torch.cat([q[..., :nope], rot(q[..., nope:], pos)], -1)
    kva = h @ dec(layer.wkv_a).T
    c = rms(kva[..., :r], gain(layer.kv_norm))  # [B, T, r]
    kpe = rot(kva[..., r:], pos)  # [B, T, rope]
    wkvb = dec(layer.wkv_b).view(H, nope + vd, r)
    wk, wv = wkvb[:, :nope], wkvb[:, nope:]

    out = torch.zeros(B, T, H, vd, dtype=F64)
    for t in range(T):
        ws = max(0, t - window + 1)  # relative to the sequence start
        lat = [c[:, p] for p in range(ws, t + 1)]
        pe = [kpe[:, p] for p in range(ws, t + 1)]
        if use_hca:
            eligible = [j for j in range(T) if j * stride < ws]  # blocks starting before the window
            for j in eligible[-hca_len:] if hca_len else []:
                blk = range(j * stride, (j + 1) * stride)
                assert max(blk) <= t  # never a future position
                lat.append(torch.stack([c[:, p] for p in blk]).mean(0))
                pe.append(torch.stack([kpe[:, p] for p in blk]).mean(0))
        lat, pe = torch.stack(lat, 1), torch.stack(pe, 1)  # [B, N, .]
        for hd in range(H):
            k = torch.cat([lat @ wk[hd].T, pe], -1)  # [B, N, nope + rope]
            v = lat @ wv[hd].T
            s = (k @ q[:, hd, t, :, None]).squeeze(-1) / math.sqrt(nope + rope)
            out[:, t, hd] = (torch.softmax(s, -1)[:, None, :] @ v).squeeze(1)
    return out.reshape(B, T, H * vd) @ dec(layer.wo).T


def decode_steps(layer, x, chunks=None):
    """Feed x through a fresh cache in chunks (default: one position at a time)."""
    cache = layer.new_cache(x.shape[0], dtype=x.dtype)
    chunks = chunks or [1] * x.shape[1]
    assert sum(chunks) == x.shape[1]
    outs, i = [], 0
    for n in chunks:
        outs.append(layer(x[:, i:i + n], cache, start_pos=i))
        i += n
    return torch.cat(outs, 1), cache


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["arb-tiny", "arb-small"])
def test_ternary_weight_count_matches_config(preset):
    cfg = get_preset(preset)
    layer = MLA(cfg)
    assert sum(m.rows * m.cols for m in ternary_matrices(layer)) == mla_layer_weights(cfg)
    assert not list(layer.parameters())  # ternary only: buffers, no float Parameters


def test_forward_shapes_and_cache_shapes():
    layer = MLA(TINY, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, TINY.d_model)
    assert layer(x).shape == (2, 5, TINY.d_model)
    cache = layer.new_cache(2)
    y = layer(x, cache)
    assert y.shape == (2, 5, TINY.d_model)
    assert cache.kv_cache.shape == (2, TINY.kv_cache_len, TINY.kv_lora_rank)
    assert cache.pe_cache.shape == (2, TINY.kv_cache_len, TINY.qk_rope_dim)
    assert cache.next_pos == 5 and cache.pos[:5].tolist() == [0, 1, 2, 3, 4]
    assert layer(x[:, :1], cache).shape == (2, 1, TINY.d_model)
    assert cache.next_pos == 6


def test_gradients_reach_every_ternary_matrix():
    layer = make_layer()
    x = torch.randn(2, 21, SMALL_WIN.d_model, requires_grad=True)  # > window: HCA path
    layer(x).square().sum().backward()
    mats = ternary_matrices(layer)
    assert len(mats) == 8
    for m in mats:
        assert m.has_evidence
        _, g = m.evidence()
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_matches_float64_reference_within_window():
    layer = make_layer(TINY)
    x = torch.randn(2, 11, TINY.d_model, dtype=F64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=0, atol=1e-10)
    # RoPE is relative: an offset start gives the same output up to rounding.
    torch.testing.assert_close(layer(x, start_pos=1000), reference(layer, x, start=1000), rtol=0, atol=1e-10)


def test_incremental_decoding_equals_full_forward():
    layer = make_layer(TINY)
    x = torch.randn(2, 13, TINY.d_model, dtype=F64)
    full = layer(x)
    step, cache = decode_steps(layer, x)
    torch.testing.assert_close(step, full, rtol=0, atol=1e-10)
    chunked, _ = decode_steps(layer, x, [5, 1, 4, 3])  # prefill, then mixed chunk sizes
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-10)
    assert cache.n_blocks == 0 and cache.hca_kv_cache.shape[1] == 0  # nothing left the window


def test_ring_wrap_is_a_sliding_window():
    layer = make_layer(use_hca=False)
    T, W = 20, SMALL_WIN.kv_cache_len
    x = torch.randn(2, T, SMALL_WIN.d_model, dtype=F64)
    ref = reference(layer, x, use_hca=False)
    step, cache = decode_steps(layer, x)
    torch.testing.assert_close(step, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-10)  # full-context path agrees
    # The ring holds the last W absolute positions, each in slot pos % W.
    assert sorted(cache.pos.tolist()) == list(range(T - W, T))
    assert all(p % W == s for s, p in enumerate(cache.pos.tolist()))
    # Before the wrap, decoding equals plain full causal attention (the reference with no window).
    torch.testing.assert_close(step[:, :W], reference(layer, x[:, :W], window=10**9), rtol=0, atol=1e-10)


@pytest.mark.parametrize("T", [23, 24, 9])  # not divisible by the stride, divisible, barely past W
def test_hca_full_context_matches_naive_reference(T):
    layer = make_layer()
    x = torch.randn(2, T, SMALL_WIN.d_model, dtype=F64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunks", [None, [5, 1, 7, 2, 8], [23]])
def test_hca_cache_matches_naive_reference(chunks):
    layer = make_layer()
    T, W, s, C = 23, 8, 4, 3
    x = torch.randn(2, T, SMALL_WIN.d_model, dtype=F64)
    out, cache = decode_steps(layer, x, chunks)
    torch.testing.assert_close(out, reference(layer, x), rtol=0, atol=1e-10)
    # Blocks starting before the last window [15, 22]: 0..3 (block 3 = [12, 16)); the last 3 kept.
    n_blocks = -(-(T - W) // s)
    assert cache.n_blocks == n_blocks == 4
    assert cache.hca_kv_cache.shape[1] == cache.hca_pe_cache.shape[1] == C
    # Contents: per-block means of the normalized latent and of the roped key (recomputed here).
    lat, pe = _latents(layer, x)
    for i, j in enumerate(range(n_blocks - C, n_blocks)):
        torch.testing.assert_close(cache.hca_kv_cache[:, i], lat[:, j * s:(j + 1) * s].mean(1), rtol=0, atol=1e-12)
        torch.testing.assert_close(cache.hca_pe_cache[:, i], pe[:, j * s:(j + 1) * s].mean(1), rtol=0, atol=1e-12)


def _latents(layer, x):
    """Normalized latent and roped key per position, from decoded weights (no module code)."""
    cfg = layer.cfg
    r, rope = cfg.kv_lora_rank, cfg.qk_rope_dim

    def rms(v, norm):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * norm.gain.decode(F64).reshape(-1)

    kva = rms(x, layer.attn_norm) @ layer.wkv_a.weight.decode(F64).T
    pos = torch.arange(x.shape[1], dtype=F64)
    ang = pos[:, None] * cfg.rope_theta ** (-torch.arange(0, rope, 2, dtype=F64) / rope)
    a, b = kva[..., r::2], kva[..., r + 1::2]
    pe = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)
    return rms(kva[..., :r], layer.kv_norm), pe


def test_hca_is_causal():
    layer = make_layer()
    x = torch.randn(1, 23, SMALL_WIN.d_model, dtype=F64)
    y = layer(x)
    for t in (8, 12, 15, 19):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
        torch.testing.assert_close(layer(x2)[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-12)


def test_crop_to_common_keeps_the_newest_entries_of_both():
    kv, pe = torch.randn(2, 5, 3), torch.randn(2, 2, 4)
    ckv, cpe = crop_to_common(kv, pe)
    assert ckv.shape == (2, 2, 3) and cpe.shape == (2, 2, 4)
    assert torch.equal(ckv, kv[:, 3:]) and torch.equal(cpe, pe)
    ckv, cpe = crop_to_common(kv[:, :1], pe)
    assert torch.equal(ckv, kv[:, :1]) and torch.equal(cpe, pe[:, 1:])
    with pytest.raises(ValueError, match="kv has 2, pe has 3"):
        crop_to_common(kv, torch.randn(3, 5, 4))


def test_mismatched_hca_caches_are_cropped_not_broadcast():
    layer = make_layer()
    x = torch.randn(2, 21, SMALL_WIN.d_model, dtype=F64)
    _, cache = decode_steps(layer, x[:, :20])
    assert cache.hca_kv_cache.shape[1] == 3

    def step(hkv, hpe):
        c = MLACache(cache.kv_cache.clone(), cache.pe_cache.clone(), cache.pos.clone(), hkv, hpe,
                     cache.next_pos, cache.n_blocks)
        return layer(x[:, 20:], c), c

    ref2, _ = step(cache.hca_kv_cache[:, 1:], cache.hca_pe_cache[:, 1:])  # both explicitly 2
    ref1, _ = step(cache.hca_kv_cache[:, 2:], cache.hca_pe_cache[:, 2:])  # both explicitly 1
    # A positional cache with one extra (older) entry, or a latent cache one short: the same 2 keys.
    extra = torch.cat([torch.randn(2, 1, SMALL_WIN.qk_rope_dim, dtype=F64), cache.hca_pe_cache[:, 1:]], 1)
    y, c = step(cache.hca_kv_cache[:, 1:], extra)
    torch.testing.assert_close(y, ref2, rtol=0, atol=0)
    y, _ = step(cache.hca_kv_cache[:, 2:], cache.hca_pe_cache)  # latent cache shorter: 1 key
    torch.testing.assert_close(y, ref1, rtol=0, atol=0)
    # A length-1 positional cache is cropped to one key, not stretched over 3 latents.
    y, _ = step(cache.hca_kv_cache, cache.hca_pe_cache[:, 2:])
    torch.testing.assert_close(y, ref1, rtol=0, atol=0)
    broadcast, _ = step(cache.hca_kv_cache, cache.hca_pe_cache[:, 2:].expand(-1, 3, -1))
    assert not torch.allclose(broadcast, ref1)
    # The cache written back after the step is consistent again.
    assert c.hca_kv_cache.shape[1] == c.hca_pe_cache.shape[1]


def test_head_split_sums_to_the_full_layer():
    """The TP contract: split wq_b / wkv_b rows and wo columns by heads, shrink n_local_heads;
    the per-shard outputs (each one's wo is row-parallel) sum to the unsplit output."""
    cfg = SMALL_WIN
    layer = make_layer(cfg)
    x = torch.randn(2, 21, cfg.d_model, dtype=F64)
    full = layer(x)
    hl, dq, dkv, vd = cfg.n_heads // 2, cfg.qk_nope_dim + cfg.qk_rope_dim, cfg.qk_nope_dim + cfg.v_head_dim, cfg.v_head_dim
    total = 0
    for rank in range(2):
        shard = make_layer(cfg)
        shard.load_state_dict(layer.state_dict())
        shard.n_local_heads = hl
        for name, per_head in (("wq_b", dq), ("wkv_b", dkv)):
            src = getattr(layer, name).weight
            rows = slice(rank * hl * per_head, (rank + 1) * hl * per_head)
            lin = TernaryLinear(src.cols, hl * per_head)
            lin.weight.set_trits(src.trits()[rows], src.exponent[rows])
            setattr(shard, name, lin)
        cols = slice(rank * hl * vd, (rank + 1) * hl * vd)
        wo = TernaryLinear(hl * vd, cfg.d_model)
        wo.weight.set_trits(layer.wo.weight.trits()[:, cols], layer.wo.weight.exponent)
        shard.wo = wo
        total = total + shard(x)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-10)


def test_bad_inputs_raise_with_expected_and_given():
    layer = MLA(TINY)
    d = TINY.d_model
    with pytest.raises(ValueError, match=f"expects {d} input features.*got {d - 1}"):
        layer(torch.randn(2, 3, d - 1))
    with pytest.raises(ValueError, match=r"shape \[batch, seq, 64\], got shape \(3, 64\)"):
        layer(torch.randn(3, d))
    cache = layer.new_cache(2)
    with pytest.raises(ValueError, match="cache holds batch 2, x has batch 3"):
        layer(torch.randn(3, 1, d), cache)
    with pytest.raises(ValueError, match="dtype torch.float32 does not match x dtype torch.float64"):
        layer(torch.randn(2, 1, d, dtype=F64), cache)
    layer(torch.randn(2, 2, d), cache)
    with pytest.raises(ValueError, match="start_pos 5 does not continue the cache \\(expected 2\\)"):
        layer(torch.randn(2, 1, d), cache, start_pos=5)
    bad = MLACache.empty(TINY.with_overrides(kv_cache_len=16), 2)
    with pytest.raises(ValueError, match=r"cache.kv_cache: expected shape \(2, 64, 32\), got \(2, 16, 32\)"):
        layer(torch.randn(2, 1, d), bad)
    with pytest.raises(ValueError, match="kv_cache_len must be >= hca_stride \\(4\\), got 2"):
        MLA(TINY.with_overrides(kv_cache_len=2))


def test_rope_tables_cached_for_a_position_range_give_the_same_rotation():
    from arbd.model import mla

    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    pos = torch.arange(5, 12)
    ref = mla.apply_rope(x, pos, 10000.0)                  # tables built for this call only
    first = mla.apply_rope(x, pos, 10000.0, start=5)       # built and cached
    again = mla.apply_rope(x, pos, 10000.0, start=5)       # from the cache
    assert torch.equal(ref, first) and torch.equal(first, again)
    key = (5, 7, 8, 10000.0, torch.float64, pos.device)
    assert key in mla._ROPE_CACHE
    # A different start is a different table: positions 0..6 rotate differently.
    assert not torch.equal(mla.apply_rope(x, torch.arange(7), 10000.0, start=0), first)


@pytest.mark.parametrize("shape, nope", [((2, 5, 3, 96), 64), ((2, 7, 32), 0), ((1, 4, 2, 14), 6), ((3, 33, 2, 40), 8), ((2, 3, 2, 6), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_tail_matches_the_torch_formula_and_float64(monkeypatch, shape, nope, dtype):
    """The Triton kernel (interpreted on CPU) against the torch path in the same dtype and against
    float64, forward and backward, on a strided input (a split's view), ragged widths included."""
    pytest.importorskip("triton")
    import os
    from arbd.model import mla
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    g = torch.Generator().manual_seed(sum(shape) + nope)
    base = torch.randn(*shape[:-1], shape[-1] + 6, generator=g, dtype=torch.float64)
    up = torch.randn(*shape, generator=g, dtype=torch.float64)
    positions = torch.arange(3, 3 + shape[1])
    out = {}
    for mode in ("on", "off", "float64"):
        monkeypatch.setattr(mla, "FUSED_ROPE", "off" if mode == "float64" else mode)
        src = (base if mode == "float64" else base.to(dtype)).to(dev).requires_grad_()
        x = src[..., 6:]   # a strided view, as the key's split gives
        y = mla.rope_tail(x, nope, positions.to(dev), 10000.0, start=3)
        assert (type(y.grad_fn).__name__ == "RopeTailFnBackward") == (mode == "on")
        (y.double() * up.to(dev)).sum().backward()
        out[mode] = (y.detach().double().cpu(), src.grad[..., 6:].double().cpu())
        assert torch.equal(src.grad[..., :6], torch.zeros_like(src.grad[..., :6]))
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for (a, b, c) in zip(out["on"], out["off"], out["float64"]):
        assert torch.allclose(a, b, rtol=tol, atol=tol)
        assert (a - c).abs().max() <= max(2 * (b - c).abs().max(), 1e-12) + tol / 10
    assert torch.equal(out["on"][0][..., :nope], base[..., 6:6 + nope].to(dtype).double())
