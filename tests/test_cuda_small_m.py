"""The CUDA small-M forward (arbd/ternary/csrc/small_m.cu) against float64, on the GPU machine.

CPU-only check at the bottom: the switch and the build's error without nvcc (tests/test_cuda_ext.py
compiles every CUDA source for sm_90 where nvcc exists).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from arbd.ternary import cuda_ext
from arbd.ternary import cuda_small_m as cs
from arbd.ternary import packing
from arbd.ternary import triton_kernels as tk

ON_GPU = torch.cuda.is_available() and cuda_ext.nvcc() is not None
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and nvcc")


def _weight(n: int, k: int, gen: torch.Generator):
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    exponent = torch.randint(-40, 20, (n,), generator=gen).to(torch.int8)
    packed = packing.pack_trits(trits)
    return packed, exponent, packing.decode(packed, exponent, k, torch.float64)


# (M, K, N) for the ragged-shape tests of both kernels.
RAGGED = [(16, 7168, 7168), (1, 7168, 7168), (9, 1001, 515), (8, 40, 173), (3, 19, 37), (16, 4096, 1000),
          (13, 80, 16), (5, 5, 1)]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref).norm() / ref.norm())


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """got (16-bit) is the float64 reference up to its own rounding to got's dtype (up to 2**-8
    relative for bf16 per element, which a tiny output with one large element can show in full)
    plus 1e-3 for fp32 accumulation."""
    return _rel_err(got, ref) < _rel_err(ref.to(got.dtype), ref) + 1e-3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 8, 1), (4, 4, 1)])
def test_every_byte_decodes_exactly(dtype, shape):
    # K = 5 and x = I: y.T is W itself, so every byte value's five trits (and the scale) show.
    gen = torch.Generator().manual_seed(0)
    every = torch.arange(243, dtype=torch.uint8).reshape(243, 1)
    e = torch.randint(-128, 128, (243,), generator=gen).to(torch.int8)
    y = cs.small_m_matmul(torch.eye(5, dtype=dtype, device="cuda"), every.cuda(), e.cuda(), 5, shape=shape)
    assert torch.equal(y.t().cpu(), packing.decode(every, e, 5, dtype))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ragged_shapes_against_float64(dtype):
    gen = torch.Generator().manual_seed(1)
    for m, k, n in RAGGED:
        packed, exponent, w = _weight(n, k, gen)
        shapes = [None] + [(r, wp, s) for r, wp in cs.SHAPES for s in (1, 3)]
        for shape in shapes:
            x = torch.randn(m, k, generator=gen).to("cuda", dtype)
            out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            y = cs.small_m_matmul(x, packed.cuda(), exponent.cuda(), k, shape=shape, out=out)
            assert not torch.isnan(y).any(), (m, k, n, shape)
            assert _close(y, x.cpu().double() @ w.t()), (m, k, n, shape)


@pytest.mark.gpu
@needs_gpu
def test_unaligned_buffers_and_strided_x():
    # Packed rows starting at every byte offset of a word, x a slice of a wider tensor.
    gen = torch.Generator().manual_seed(2)
    m, k, n = 16, 1003, 301
    packed, exponent, w = _weight(n, k, gen)
    ref_x = torch.randn(m, k + 7, generator=gen).to("cuda", torch.bfloat16)
    x = ref_x[:, 3:3 + k]
    assert x.stride(0) == k + 7
    for offset in range(4):
        buf = torch.randint(0, 243, (packed.numel() + 8,), dtype=torch.uint8, generator=gen).cuda()
        view = buf[offset:offset + packed.numel()].view(n, packed.shape[1])
        view.copy_(packed)
        y = cs.small_m_matmul(x, view, exponent.cuda(), k)
        assert _rel_err(y, x.cpu().double() @ w.t()) < 3e-3, offset


@pytest.mark.gpu
@needs_gpu
def test_deterministic_and_graphs_replay():
    gen = torch.Generator().manual_seed(3)
    m, k, n = 12, 2000, 700
    packed, exponent, w = _weight(n, k, gen)
    packed, exponent = packed.cuda(), exponent.cuda()
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    first = cs.small_m_matmul(x, packed, exponent, k)
    assert _rel_err(first, x.cpu().double() @ w.t()) < 3e-3
    # The cluster adds the split-K partial sums in a fixed order: bit-identical on every call.
    assert torch.equal(first, cs.small_m_matmul(x, packed, exponent, k))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cs.small_m_matmul(x, packed, exponent, k)
    x.copy_(torch.randn(m, k, generator=gen).to(torch.bfloat16))
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(captured, x.cpu().double() @ w.t()) < 3e-3


@pytest.mark.gpu
@needs_gpu
def test_ternary_matmul_takes_it_for_small_m(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    packed, exponent, w = _weight(515, 1001, gen)
    monkeypatch.setenv("ARBD_CUDA_SMALL_M", "on")
    calls = []
    real = cs.small_m_matmul
    monkeypatch.setattr(cs, "small_m_matmul", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, 16, 17):
        x = torch.randn(m, 1001, generator=gen).to("cuda", torch.bfloat16)
        y = tk.ternary_matmul(x, packed.cuda(), exponent.cuda(), 1001)
        assert _rel_err(y, x.cpu().double() @ w.t()) < 3e-3
    assert calls == [1, 16]  # M = 17 goes to the Triton small-M kernel
    long_k = 5 * cs.MAX_KB + 5  # rows longer than one cluster covers: the Triton kernel too
    packed_l, exponent_l, w_l = _weight(3, long_k, gen)
    x = torch.randn(2, long_k, generator=gen).to("cuda", torch.bfloat16)
    assert _rel_err(tk.ternary_matmul(x, packed_l.cuda(), exponent_l.cuda(), long_k), x.cpu().double() @ w_l.t()) < 3e-3
    assert calls == [1, 16]
    monkeypatch.setenv("ARBD_CUDA_SMALL_M", "off")
    tk.ternary_matmul(torch.randn(4, 1001, device="cuda", dtype=torch.bfloat16), packed.cuda(), exponent.cuda(), 1001)
    assert calls == [1, 16]


def test_bad_switch_and_missing_nvcc_are_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("ARBD_CUDA_SMALL_M", "maybe")
    with pytest.raises(ValueError, match="one of on, off, tiled"):
        cs.mode()
    monkeypatch.delenv("ARBD_CUDA_SMALL_M")
    assert cs.mode() == "off"  # the Triton kernel is the default
    monkeypatch.setenv("ARBD_CUDA_SMALL_M", "on")
    assert not cs.usable(torch.zeros(4, 8, dtype=torch.bfloat16), 2)  # CPU tensors never take it
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        cuda_ext.build(cs.SOURCE, "90")


# -- The tile-major copy (cuda_small_m.tile_major) and its kernel (tiled_kernel) ------------------

@pytest.mark.parametrize("n,k", [(16, 80), (7, 5), (33, 173), (100, 1001), (48, 160), (17, 161)])
def test_tile_major_holds_every_trit_where_its_docstring_says(n, k):
    gen = torch.Generator().manual_seed(10)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    tiled = cs.tile_major(packing.pack_trits(trits), k)
    assert tiled.dtype == torch.int32 and tiled.shape == (-(-n // 16), -(-(-(-k // 80)) // 2), 32, 4)
    assert torch.equal(cs.untile(tiled, n, k).long(), trits)
    # An independent read of 64 words by the documented rule, digit by digit.
    words = tiled.reshape(-1).tolist()
    picks = torch.randint(0, len(words), (64,), generator=gen).tolist()
    pairs = tiled.shape[1]
    for flat in picks:
        c, lane, p, t = flat % 4, flat // 4 % 32, flat // 128 % pairs, flat // (128 * pairs)
        (g, q), (u, h) = divmod(lane, 4), divmod(c, 2)
        row, j = 16 * t + g + 8 * h, 2 * p + u
        w = words[flat] & 0xFFFFFFFF
        for i in range(4):
            byte = (w >> (8 * i)) & 0xFF
            for s in range(5):
                kk = 80 * j + 16 * s + 4 * q + i
                want = int(trits[row, kk]) + 1 if row < n and kk < k else 1  # zero trits past W
                assert byte // 3 ** s % 3 == want, (flat, i, s)


def test_tiled_copy_is_kept_until_the_weight_changes_or_dies():
    gen = torch.Generator().manual_seed(11)
    packed = packing.pack_trits(torch.randint(-1, 2, (20, 90), generator=gen))
    first = cs.tiled_copy(packed, 90)
    assert cs.tiled_copy(packed, 90) is first  # same version: the cached copy
    packed[3].copy_(packing.pack_trits(torch.randint(-1, 2, (1, 90), generator=gen))[0])  # an in-place write
    second = cs.tiled_copy(packed, 90)
    assert second is not first and torch.equal(cs.untile(second, 20, 90), packing.unpack_trits(packed, 90))
    key = id(packed)
    del packed
    assert key not in cs._TILED  # dropped with its weight


def _tiled(x, packed, exponent, k, variant=None, out=None):
    return cs.tiled_matmul(x, cs.tile_major(packed, k), exponent, packed.shape[0], k, variant=variant, out=out)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_every_byte_decodes_exactly(dtype):
    gen = torch.Generator().manual_seed(12)
    every = torch.arange(243, dtype=torch.uint8).reshape(243, 1).cuda()
    e = torch.randint(-128, 128, (243,), generator=gen).to(torch.int8).cuda()
    variants = cs.tiled_variants(torch.device("cuda"))
    assert cs.DEFAULT_TILED in variants and len(variants) >= 5  # every computing variant, no probe
    assert len(cs.tiled_variants(torch.device("cuda"), probes=True)) > len(variants)
    for variant in variants:
        y = _tiled(torch.eye(5, dtype=dtype, device="cuda"), every, e, 5, variant)
        assert torch.equal(y.t().cpu(), packing.decode(every.cpu(), e.cpu(), 5, dtype)), variant


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_ragged_shapes_against_float64(dtype):
    gen = torch.Generator().manual_seed(13)
    for m, k, n in RAGGED + [(16, 161, 17), (2, 7, 3)]:  # and rows / columns past a tile or super-block
        packed, exponent, w = _weight(n, k, gen)
        packed, exponent = packed.cuda(), exponent.cuda()
        tiled = cs.tile_major(packed, k)
        for variant in [None] + cs.tiled_variants(torch.device("cuda")):
            x = torch.randn(m, k, generator=gen).to("cuda", dtype)
            out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            y = cs.tiled_matmul(x, tiled, exponent, n, k, variant=variant, out=out)
            assert not torch.isnan(y).any(), (m, k, n, variant)
            assert _close(y, x.cpu().double() @ w.t()), (m, k, n, variant)


@pytest.mark.gpu
@needs_gpu
def test_tiled_unaligned_strided_x_and_graph_replay():
    gen = torch.Generator().manual_seed(14)
    m, k, n = 16, 1003, 301
    packed, exponent, w = _weight(n, k, gen)
    packed, exponent = packed.cuda(), exponent.cuda()
    # A chain of two calls with nothing between them: x [m, k] -> a [m, 304] -> b [m, 301].
    pa, ea, wa = _weight(304, k, gen)
    pb, eb, wb = _weight(n, 304, gen)
    ta, tb, ea, eb = cs.tile_major(pa.cuda(), k), cs.tile_major(pb.cuda(), 304), ea.cuda(), eb.cuda()
    wide = torch.randn(m, k + 7, generator=gen).to("cuda", torch.bfloat16)
    x = wide[:, 3:3 + k]  # 2-byte aligned, odd row stride: copied into padded rows
    first = _tiled(x, packed, exponent, k)
    assert _rel_err(first, x.cpu().double() @ w.t()) < 3e-3
    assert torch.equal(first, _tiled(x, packed, exponent, k))  # fixed summation order
    plain = cs.tiled_matmul(x, cs.tile_major(packed, k), exponent, n, k, pdl=False)
    assert torch.equal(first, plain)  # programmatic dependent launch changes timing, not results
    # Positions past K inside the padded row hold garbage the kernel must not read: NaN there.
    xp = torch.full((m, 1008), float("nan"), dtype=torch.bfloat16, device="cuda")
    xp[:, :k] = x
    assert torch.equal(_tiled(xp[:, :k], packed, exponent, k), first)
    tiled = cs.tile_major(packed, k)
    xs = x.contiguous()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # back-to-back calls, each waiting for the one before (PDL edges)
        captured = cs.tiled_matmul(xs, tiled, exponent, n, k)
        a = cs.tiled_matmul(xs, ta, ea, 304, k)
        b = cs.tiled_matmul(a, tb, eb, n, 304)
    for _ in range(2):
        xs.copy_(torch.randn(m, k, generator=gen).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(captured, xs.cpu().double() @ w.t()) < 3e-3
        assert _rel_err(a, xs.cpu().double() @ wa.t()) < 3e-3
        # b's kernel reads a, which the kernel just before it writes: it must see a complete.
        assert a.data_ptr() % 8 == 0 and a.stride(0) % 4 == 0  # so no copy runs between the two
        assert _rel_err(b, a.cpu().double() @ wb.t()) < 3e-3


@pytest.mark.gpu
@needs_gpu
def test_ternary_matmul_takes_the_tiled_kernel_when_asked(monkeypatch):
    gen = torch.Generator().manual_seed(15)
    packed, exponent, w = _weight(515, 1001, gen)
    packed, exponent = packed.cuda(), exponent.cuda()
    monkeypatch.setenv("ARBD_CUDA_SMALL_M", "tiled")
    calls = []
    real = cs.tiled_matmul
    monkeypatch.setattr(cs, "tiled_matmul", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, 16, 17):
        x = torch.randn(m, 1001, generator=gen).to("cuda", torch.bfloat16)
        assert _rel_err(tk.ternary_matmul(x, packed, exponent, 1001), x.cpu().double() @ w.t()) < 3e-3
    assert calls == [1, 16]  # M = 17 goes to the Triton small-M kernel
    copy = cs.tiled_copy(packed, 1001)
    assert cs.tiled_copy(packed, 1001) is copy  # kept across calls
    # A write to the weight (the update kernels bump the version) gives a fresh copy and new results.
    trits = torch.randint(-1, 2, (515, 1001), generator=gen)
    packed.copy_(packing.pack_trits(trits).cuda())
    x = torch.randn(4, 1001, generator=gen).to("cuda", torch.bfloat16)
    ref = x.cpu().double() @ packing.decode(packing.pack_trits(trits), exponent.cpu(), 1001, torch.float64).t()
    assert _rel_err(tk.ternary_matmul(x, packed, exponent, 1001), ref) < 3e-3
    assert cs.tiled_copy(packed, 1001) is not copy
