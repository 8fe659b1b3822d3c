"""arbd/sync_free.py against the torch ops it replaces."""
import pytest
import torch

from arbd.sync_free import bin_counts


@pytest.mark.parametrize("n", [1, 3, 17])
def test_bin_counts_equal_bincount_with_minlength(n):
    g = torch.Generator().manual_seed(n)
    for size in (0, 1, 50):
        idx = torch.randint(0, n, (size,), generator=g)
        got = bin_counts(idx, n)
        assert got.dtype == torch.int64 and got.shape == (n,)
        assert torch.equal(got, torch.bincount(idx, minlength=n))
    # every value seen, in any shape and integer type
    idx = torch.arange(n, dtype=torch.int32).repeat(3).reshape(3, n)
    assert torch.equal(bin_counts(idx, n), torch.full((n,), 3, dtype=torch.int64))
