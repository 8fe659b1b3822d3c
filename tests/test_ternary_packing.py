import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from arbd.config import SCALE_K
from arbd.ternary import packing


def _random_trits(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(torch.int8)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 7), n=st.integers(1, 41), seed=st.integers(0, 2**31 - 1))
def test_round_trip_any_shape(rows, n, seed):
    trits = _random_trits((rows, n), seed)
    packed = packing.pack_trits(trits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, math.ceil(n / 5))
    assert int(packed.max()) <= packing.MAX_PACKED_BYTE
    assert torch.equal(packing.unpack_trits(packed, n), trits)


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_round_trip_batched_leading_dims(shape, seed):
    trits = _random_trits(tuple(shape) + (13,), seed)
    assert torch.equal(packing.unpack_trits(packing.pack_trits(trits), 13), trits)


def test_byte_layout_is_base3_least_significant_first():
    # trits (1, 0, -1, 0, 1) -> digits (2, 1, 0, 1, 2) -> 2 + 1*3 + 0*9 + 1*27 + 2*81 = 194
    t = torch.tensor([[1, 0, -1, 0, 1, -1]], dtype=torch.int8)
    packed = packing.pack_trits(t)
    assert packed.tolist() == [[194, 0 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81]]


def test_rows_are_independent_byte_slices():
    trits = _random_trits((9, 23), 3)
    packed = packing.pack_trits(trits)
    for r in (0, 4, 8):
        assert torch.equal(packing.pack_trits(trits[r:r + 1]), packed[r:r + 1])


def test_wrong_length_and_dtype_rejected():
    packed = packing.pack_trits(_random_trits((2, 12), 0))
    with pytest.raises(ValueError, match="expected 3 bytes"):
        packing.unpack_trits(packed[:, :2], 12)
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_trits(packed.to(torch.int16), 12)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        packing.validate_packed(packed[:, :2].contiguous(), 2, 12)
    bad = packed.clone()
    bad[0, 0] = 250
    with pytest.raises(ValueError, match="above 242"):
        packing.validate_packed(bad, 2, 12)


def test_scales_follow_documented_formula():
    e = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    got = packing.exponent_to_scale(e, torch.float64)
    want = torch.tensor([2.0 ** (v / SCALE_K) for v in range(-128, 128)], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.equal(packing.scale_to_exponent(want.float()), e)


def test_decode_matches_definition():
    trits = _random_trits((5, 17), 7)
    e = torch.tensor([-20, -1, 0, 3, 100], dtype=torch.int8)
    w = packing.decode(packing.pack_trits(trits), e, 17, torch.float64)
    ref = trits.double() * torch.tensor([2.0 ** (v / SCALE_K) for v in e.tolist()], dtype=torch.float64)[:, None]
    assert torch.equal(w, ref)
