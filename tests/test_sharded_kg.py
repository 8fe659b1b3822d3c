"""Row-sharded KG edges equal one unsharded KGEdges fed all ranks' pairs (gloo, W = 1..4)."""
import pytest
import torch

from arbd.model.kg_edges import KGEdges
from arbd.parallel.launch_utils import run_on_ranks
from arbd.parallel.sharded_kg import ShardedKGEdges

N, CAP, STEPS, PAIRS = 37, 3, 6, 20


def _pairs(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = 0 if (rank == 1 and step == 2) else PAIRS          # a rank with nothing to send
    return torch.randint(0, 12, (n,), generator=g) * 3 % N, torch.randint(0, N, (n,), generator=g)


def _worker(rank, world, shard_sizes):
    edges = ShardedKGEdges(N, CAP, shard_sizes=shard_sizes)
    for step in range(STEPS):
        edges.observe(*_pairs(step, rank))
    occ = edges.occupancy()
    torch.distributed.all_reduce(occ, group=edges.group)   # what the trainer logs
    asked = torch.arange(N).flip(0)[rank::2]            # overlapping requests, reversed order
    nbr, w = edges.neighbors(asked)
    try:
        edges.observe(torch.tensor([N if rank == 0 else 1]), torch.tensor([2]))
        err = None
    except ValueError as e:
        err = str(e)
    return {"rows": (edges.global_start, edges.global_stop, *edges.table()),
            "asked": asked, "nbr": nbr, "w": w, "err": err, "occ": occ}


@pytest.mark.parametrize("world, sizes", [(1, None), (2, [30, 7]), (3, None), (4, [1, 20, 6, 10])])
def test_sharded_edges_equal_unsharded(world, sizes):
    ref = KGEdges(N, CAP)
    for step in range(STEPS):
        parts = [_pairs(step, r) for r in range(world)]
        ref.observe(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    results = run_on_ranks(_worker, world, sizes)
    covered = 0
    ref_ids, ref_counts = ref.table()
    for res in results:
        start, stop, dst, w = res["rows"]
        assert torch.equal(dst, ref_ids[start:stop]) and torch.equal(w, ref_counts[start:stop])
        covered += stop - start
        assert torch.equal(res["nbr"], ref_ids[res["asked"]])
        assert torch.equal(res["w"], ref_counts[res["asked"]].to(torch.int16))
        assert res["err"] is not None and "[0, 37)" in res["err"]   # every rank raised
    assert covered == N
    used = ref_ids >= 0
    assert used.any() and used.all(1).any()       # some rows are full at capacity 3
    counted = [N, used.any(1).sum(), used.all(1).sum(), used.sum()]
    assert ref.occupancy().tolist() == [float(c) for c in counted]
    for res in results:                           # summed over shards == the whole graph
        assert res["occ"].tolist() == [float(c) for c in counted]
