"""The fused large-M forward (arbd/ternary/csrc/large_m.cu) against float64 on the GPU machine, and
its fragment-word layout against an independent read on the CPU."""
from __future__ import annotations

import pytest
import torch

from arbd.ternary import cuda_ext
from arbd.ternary import cuda_large_m as lm
from arbd.ternary import packing

ON_HOPPER = (torch.cuda.is_available() and cuda_ext.nvcc() is not None
             and cuda_ext.device_info(torch.device("cuda"))[0] == (9, 0))
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU and nvcc")


def _weight(n: int, k: int, gen: torch.Generator):
    trits = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    exponent = torch.randint(-40, 20, (n,), generator=gen).to(torch.int8)
    return trits, packing.pack_trits(trits), exponent


def _unfrag(words: torch.Tensor) -> torch.Tensor:
    """Digits [n_pad, k_tiles * 64] of a fragment-word copy, read word by word (not by
    frags_reference's code)."""
    tiles, k_tiles = words.shape[:2]
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.full((tiles * 128, k_tiles * 64), -1, dtype=torch.int64)
    for c in range(256):
        cw, wp, g, q = c // 128, (c % 128) // 32, (c % 32) // 4, c % 4
        for h in range(2):
            rows = torch.arange(tiles) * 128 + 64 * cw + 16 * wp + g + 8 * h
            for j in range(8):
                s_, e = j // 2, j % 2
                for odd in range(2):
                    cols = torch.arange(k_tiles) * 64 + 16 * s_ + 2 * q + 8 * e + odd
                    out[rows.view(-1, 1), cols.view(1, -1)] = (w[:, :, c, h] >> (16 * odd + 2 * j)) & 3
    return out


@pytest.mark.parametrize("n,k", [(300, 328), (1, 8), (257, 65), (16, 640)])
def test_fragment_words_hold_the_trits_and_zero_padding(n, k):
    trits, packed, _ = _weight(n, k, torch.Generator().manual_seed(n + k))
    words = lm.frags_reference(packed, k)
    n_pad, k_tiles = lm.padded_shape(n, k)
    assert words.shape == (n_pad // 128, k_tiles, 256, 2) and words.dtype == torch.int32
    digits = _unfrag(words)
    assert (digits >= 0).all()  # every (row, column) is in exactly one word
    assert torch.equal(digits[:n, :k] - 1, trits.long())
    assert (digits[n:] == 1).all() and (digits[:, k:] == 1).all()  # padding is trit 0


def test_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("ARBD_CUDA_LARGE_M", "yes")
    with pytest.raises(ValueError, match="ARBD_CUDA_LARGE_M"):
        lm.mode()


def test_cpu_tensors_never_take_the_kernel(monkeypatch):
    monkeypatch.setenv("ARBD_CUDA_LARGE_M", "on")
    x = torch.randn(512, 64).to(torch.bfloat16)
    assert not lm.usable(x, 64, 64)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref).norm() / ref.norm())


def _matches(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """got (bf16) is the float64 reference up to one bf16 rounding step per element (the fp32 sum is
    scaled, then rounded, so an element can land one ulp from ref's own rounding) plus fp32
    accumulation, and no worse than ref's own rounding plus 1e-3 over the whole output."""
    diff = (got.double().cpu() - ref).abs()
    elementwise = bool((diff <= 2 ** -7 * ref.abs() + 1e-3 * ref.abs().max()).all())
    return elementwise and _rel_err(got, ref) < _rel_err(ref.to(torch.bfloat16), ref) + 1e-3


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("n,k", [(300, 328), (7168, 7168), (514, 1000), (1, 8), (129, 1000)])
def test_frags_copy_equals_reference(n, k):
    _, packed, _ = _weight(n, k, torch.Generator().manual_seed(k))
    assert torch.equal(lm.frags_copy(packed.cuda(), k).cpu(), lm.frags_reference(packed, k))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("n,k,start", [(300, 1001, 0), (300, 1001, 3), (77, 328, 1), (129, 64, 2)])
def test_frags_copy_ignores_spare_digits_and_takes_any_view(n, k, start):
    # The unused digits of each row's last byte set to 2 (trit +1): the copy must read them as zero
    # trits, as unpack_trits ignores them. Rows start `start` bytes into a larger buffer, so that
    # the copy's aligned-word loads meet every alignment, and the buffer's edges.
    _, packed, _ = _weight(n, k, torch.Generator().manual_seed(n + start))
    used = k % 5
    if used:
        keep = packed[:, -1].to(torch.int64) % 3 ** used
        packed[:, -1] = (keep + sum(2 * 3 ** e for e in range(used, 5))).to(torch.uint8)
    kb = packed.shape[1]
    flat = torch.zeros(start + n * kb, dtype=torch.uint8)
    flat[start:] = packed.reshape(-1)
    view = flat.cuda()[start:].view(n, kb)
    assert torch.equal(lm.frags_copy(view, k).cpu(), lm.frags_reference(packed, k))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("stages", lm.STAGES)
@pytest.mark.parametrize("m,n,k", [(200, 304, 328), (129, 520, 1000), (1, 8, 8), (1000, 1536, 2048),
                                   (256, 7168, 7168), (77, 264, 136), (2000, 136, 64), (300, 1000, 7000)])
def test_fused_product_matches_float64(m, n, k, stages):
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    _, packed, exponent = _weight(n, k, gen)
    # The reference multiplies by W as the dense path decodes it: trits times the bf16 scale, which
    # the kernel applies to its fp32 sums (float64 scales differ from it by up to 2^-9).
    w = packing.decode(packed, exponent, k, torch.bfloat16).double()
    for _ in range(2):  # fresh x each time
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        lm.large_m_matmul(x.cuda(), packed.cuda(), exponent.cuda(), k, stages=stages, out=y)
        ref = x.double() @ w.t()
        assert not y.isnan().any()
        assert _matches(y, ref), (y[:2, :8], ref[:2, :8])


@pytest.mark.gpu
@needs_hopper
def test_strided_x_and_out_and_a_given_copy():
    # out[:, 40:552]: row stride 600, an 80-byte offset; TMA clips the boxes at its 512 columns.
    gen = torch.Generator().manual_seed(5)
    _, packed, exponent = _weight(512, 640, gen)
    w = packing.decode(packed, exponent, 640, torch.bfloat16).double()
    big = torch.randn(300, 800, generator=gen).to(torch.bfloat16).cuda()
    x = big[:, 16:656]  # row stride 800, 32-byte offset
    out = torch.full((300, 600), float("nan"), dtype=torch.bfloat16, device="cuda")
    frags = lm.frags_copy(packed.cuda(), 640)
    lm.large_m_matmul(x, packed.cuda(), exponent.cuda(), 640, frags=frags, out=out[:, 40:552])
    ref = x.double().cpu() @ w.t()
    assert _matches(out[:, 40:552], ref)
    assert out[:, :40].isnan().all() and out[:, 552:].isnan().all()  # nothing written outside


@pytest.mark.gpu
@needs_hopper
def test_bad_shapes_are_refused():
    _, packed, exponent = _weight(64, 60, torch.Generator().manual_seed(1))
    x = torch.randn(300, 60, device="cuda")
    with pytest.raises(ValueError, match="bf16"):
        lm.large_m_matmul(x.half(), packed.cuda(), exponent.cuda(), 60)
    _, packed, exponent = _weight(64, 61, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="K % 8"):
        lm.large_m_matmul(torch.randn(300, 61, device="cuda").to(torch.bfloat16), packed.cuda(), exponent.cuda(), 61)
    _, packed, exponent = _weight(64, 64, torch.Generator().manual_seed(1))
    x = torch.randn(300, 64, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="N % 8"):
        lm.large_m_matmul(x, packed[:60].cuda(), exponent[:60].cuda(), 64)
    with pytest.raises(ValueError, match="16-byte-aligned"):
        lm.large_m_matmul(x, packed.cuda(), exponent.cuda(), 64,
                          out=torch.empty(300, 72, dtype=torch.bfloat16, device="cuda")[:, 4:68])
    with pytest.raises(ValueError, match="frags must be"):
        lm.large_m_matmul(torch.randn(300, 64, device="cuda").to(torch.bfloat16), packed.cuda(), exponent.cuda(), 64,
                          frags=torch.zeros(1, 1, 256, 3, dtype=torch.int32, device="cuda"))


@pytest.mark.gpu
@needs_hopper
def test_the_switch_routes_ternary_matmul_through_the_kernel(monkeypatch):
    from arbd.ternary import triton_kernels as tk
    gen = torch.Generator().manual_seed(9)
    _, packed, exponent = _weight(512, 1024, gen)
    x = torch.randn(300, 1024, generator=gen).to(torch.bfloat16).cuda()
    packed, exponent = packed.cuda(), exponent.cuda()
    fused = lm.large_m_matmul(x, packed, exponent, 1024)
    monkeypatch.setenv("ARBD_CUDA_LARGE_M", "on")
    assert torch.equal(tk.ternary_matmul(x, packed, exponent, 1024), fused)
    monkeypatch.setenv("ARBD_CUDA_LARGE_M", "off")
    ref = x.double().cpu() @ packing.decode(packed.cpu(), exponent.cpu(), 1024, torch.bfloat16).double().t()
    assert _matches(tk.ternary_matmul(x, packed, exponent, 1024), ref)  # off: decode + cuBLAS
