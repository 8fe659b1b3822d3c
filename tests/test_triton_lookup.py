"""The fused Triton candidate lookup (arbd/vq/triton_lookup.py) against the torch stages.

Runs on CPU through TRITON_INTERPRET=1 (tests/conftest.py sets it unless already set); `TRITON_INTERPRET=0 pytest -m gpu` runs it compiled on a GPU. The reference is the torch path of arbd/vq/lookup.py, which test_vq.py checks
against a float64 brute force; here ids, valid flags and chosen rows must be identical.
The interpreter is slow (~0.2 s a query), so batches are small.
"""

import pytest
import torch

pytest.importorskip("triton")

from arbd.ternary import packing  # noqa: E402
from arbd.vq import lookup, triton_lookup  # noqa: E402
from arbd.vq.codebook import TernaryVQCodebook  # noqa: E402

INTERPRETED = type(triton_lookup._lookup_kernel).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA and the Triton interpreter could not be enabled", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"


def _queries(cb: TernaryVQCodebook, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    # Half near a row (so the probes matter), half Gaussian; never zeros.
    g = torch.Generator().manual_seed(seed)
    near = cb.decode_rows(torch.randint(0, cb.num_codes, (n // 2,), generator=g).to(DEVICE))
    near = near + 0.35 * torch.randn(near.shape, generator=g).to(DEVICE)
    far = torch.randn(n - n // 2, cb.dim, generator=g).to(DEVICE)
    return torch.cat([near, far]) * scale


def _both(cb: TernaryVQCodebook, x: torch.Tensor):
    xq, unit = lookup.quantize_queries(x)
    m, c = cb.matrix, cb.candidate_count
    ref = lookup.candidate_search(xq, unit, m.packed, m.exponent, cb.dim, cb.hasher, cb.layout,
                                  c, 1 << 26, use_triton=False)[0]
    got = lookup.candidate_search(xq, unit, m.packed, m.exponent, cb.dim, cb.hasher, cb.layout,
                                  c, 1 << 26, use_triton=True)[0]
    return ref, got


# (rows, dim, candidate_count, cell_size): the default shape scaled down, a dim that leaves a
# partial last byte and no power of two anywhere, a count that is no power of two, wider cells.
CASES = [(5000, 64, 64, 1), (3001, 37, 20, 1), (20011, 64, 13, 3), (4096, 70, 33, 2)]


@pytest.mark.parametrize("rows,dim,c,cell", CASES)
def test_ids_and_choice_equal_torch(rows, dim, c, cell):
    cb = TernaryVQCodebook(rows, dim, candidate_count=c, exact_max=0, cell_size=cell, device=DEVICE)
    x = _queries(cb, 12, seed=rows)
    xq, unit = lookup.quantize_queries(x)
    assert lookup.triton_plan(xq, cb.hasher, cb.layout, c, use_triton=True) is not None
    ri, rv = lookup.candidate_ids(xq, cb.hasher, cb.layout, c, use_triton=False)
    ti, tv = lookup.candidate_ids(xq, cb.hasher, cb.layout, c, use_triton=True)
    assert torch.equal(ri, ti) and torch.equal(rv, tv)
    ref, got = _both(cb, x)
    assert torch.equal(ref, got)
    # The fused kernel that also quantizes (raw float input) and the score-only entry agree.
    cfg = triton_lookup.plan(dim, cb.hasher, cb.layout, c)
    m = cb.matrix
    fused = triton_lookup.candidate_search(x, None, m.packed, m.exponent, cb.hasher, cb.layout,
                                           cfg, quantize=True)
    scored = triton_lookup.best_of(xq, unit, m.packed, m.exponent, ri, rv, cfg, cb.hasher)
    assert torch.equal(fused, ref) and torch.equal(scored, ref)
    via_api = lookup.search_candidates(x, m.packed, m.exponent, dim, cb.hasher, cb.layout, c,
                                       1 << 26, use_triton=True)
    assert torch.equal(via_api[0], ref) and via_api[1] == x.shape[0] * c
    # Same ids, hence the same quantized vectors.
    assert torch.equal(cb.decode_rows(got), cb.decode_rows(ref))


def test_extreme_scales_and_half_input():
    cb = TernaryVQCodebook(5000, 64, candidate_count=64, exact_max=0, device=DEVICE)
    m = cb.matrix
    cfg = triton_lookup.plan(64, cb.hasher, cb.layout, 64)
    for scale in (1e-20, 3e5):
        x = _queries(cb, 6, seed=7, scale=scale)
        ref, got = _both(cb, x)
        assert torch.equal(ref, got)
        assert torch.equal(triton_lookup.candidate_search(
            x, None, m.packed, m.exponent, cb.hasher, cb.layout, cfg, quantize=True), ref)
    x = _queries(cb, 6, seed=8).half()
    ref, _ = _both(cb, x)
    got = triton_lookup.candidate_search(x, None, m.packed, m.exponent, cb.hasher, cb.layout, cfg,
                                         quantize=True)
    assert torch.equal(got, ref)


def test_ties_go_to_lowest_id_and_invalid_bytes_decode_to_zero():
    cb = TernaryVQCodebook(3000, 64, candidate_count=16, exact_max=0, device=DEVICE)
    m = cb.matrix
    g = torch.Generator().manual_seed(3)
    # Every row equal: all candidates tie, so the lowest candidate id must win.
    m.packed.copy_(m.packed[:1].expand_as(m.packed))
    m.exponent.fill_(int(m.exponent[0]))
    x = torch.randn(8, 64, generator=g).to(DEVICE)
    ref, got = _both(cb, x)
    ids, valid = cb.candidate_ids(x)
    assert torch.equal(got, ref) and torch.equal(got, torch.where(valid, ids, ids.max()).amin(1))
    # Bytes above 242 are not base-3 trits; both paths read them as five zeros.
    m.packed[::2, 3] = 250
    m.exponent.copy_(torch.randint(-40, 40, m.exponent.shape, generator=g).to(torch.int8))
    ref, got = _both(cb, x)
    assert torch.equal(ref, got)


def test_unsupported_shapes_fall_back_to_torch():
    # One probe (candidates fit in the query's own cell) and a table too small for a hash bit.
    for rows, c, cell in ((4000, 2, 4), (1, 1, 1)):
        cb = TernaryVQCodebook(rows, 16, candidate_count=c, exact_max=0, cell_size=cell,
                               device=DEVICE)
        assert triton_lookup.plan(16, cb.hasher, cb.layout, c) is None
        ref, got = _both(cb, torch.randn(5, 16).to(DEVICE))
        assert torch.equal(ref, got)


def test_empty_batch():
    cb = TernaryVQCodebook(5000, 64, candidate_count=8, exact_max=0, device=DEVICE)
    ref, got = _both(cb, torch.zeros(0, 64, device=DEVICE))
    assert got.shape == (0,) and ref.shape == (0,)


@pytest.mark.parametrize("width", [16, 13, 8, 1])
def test_gather_rows_equals_indexing(width):
    g = torch.Generator().manual_seed(width)
    table = torch.randint(0, 243, (1000, width), generator=g, dtype=torch.uint8).to(DEVICE)
    for shape in ((333,), (7, 11), (0,)):
        ids = torch.randint(0, 1000, shape, generator=g).to(DEVICE)
        assert torch.equal(triton_lookup.gather_rows(table, ids, block=64), table[ids])
    # An unaligned view (rows start at byte 1) falls back to byte words and stays right.
    view = torch.randint(0, 243, (1000 * width + 1,), generator=g, dtype=torch.uint8)[1:]
    view = view.to(DEVICE).view(1000, width)
    ids = torch.randint(0, 1000, (50,), generator=g).to(DEVICE)
    assert torch.equal(triton_lookup.gather_rows(view, ids, block=64), view[ids])
    assert packing.packed_cols(64) == 13  # the codebook's row width is one of the cases


def test_sign_tables_belong_to_their_hasher():
    # A cache keyed by id(hasher) once handed a new codebook the signs of a freed one.
    a = TernaryVQCodebook(5000, 64, candidate_count=8, exact_max=0, hash_seed=1, device=DEVICE)
    b = TernaryVQCodebook(70001, 64, candidate_count=8, exact_max=0, hash_seed=2, device=DEVICE)
    for cb in (a, b, a):
        got = triton_lookup._signs(cb.hasher, torch.device(DEVICE)).cpu()
        assert torch.equal(got, cb.hasher.signs.reshape(-1).to(torch.int32))
