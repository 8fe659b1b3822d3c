"""GPU checks of the fused Triton lookup and the row gather (run on the lent GPU machine).

The reference is the CPU torch path (itself checked against float64 brute force in test_vq.py):
the codebook's CUDA lookup, which takes the Triton kernel by default, must choose the same ids.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _queries(cb, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    near = cb.decode_rows(torch.randint(0, cb.num_codes, (n // 2,), generator=g))
    near = near + 0.35 * torch.randn(near.shape, generator=g)
    return torch.cat([near, 2.0 * torch.randn(n - n // 2, cb.dim, generator=g)])


@pytest.mark.parametrize("rows,dim,c", [(300_000, 64, 64), (200_003, 37, 100), (70_001, 64, 16)])
def test_cuda_triton_lookup_equals_cpu(rows, dim, c):
    from arbd.vq import lookup
    from arbd.vq.codebook import TernaryVQCodebook

    cb = TernaryVQCodebook(rows, dim, candidate_count=c, exact_max=0)
    x = _queries(cb, 3001, seed=rows)
    cpu_ids = cb.lookup(x)
    cb.cuda()
    xc = x.cuda()
    assert lookup.triton_plan(xc, cb.hasher, cb.layout, c) is not None
    assert torch.equal(cb.lookup(xc).cpu(), cpu_ids)
    assert torch.equal(cb.lookup(xc.half()).cpu(), cb.cpu().lookup(x.half()))


def test_cuda_gather_rows():
    from arbd.vq.triton_lookup import gather_rows

    for width in (16, 13):
        table = torch.randint(0, 243, (100_003, width), dtype=torch.uint8, device="cuda")
        ids = torch.randint(0, 100_003, (77_777,), device="cuda")
        assert torch.equal(gather_rows(table, ids), table[ids])
