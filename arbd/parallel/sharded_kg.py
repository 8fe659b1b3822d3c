"""KG edges row-sharded with the codebook: the rank that owns motif n's codebook row also owns
motif n's adjacency row (ARCHITECTURE §3).

`observe` routes each co-occurrence pair to the owner of its source node with one
`all_to_all_single`; `neighbors` fetches adjacency rows from their owners and returns them in
the caller's order. Both are collectives over the codebook group: every rank calls them, in the
same order, even with nothing to send. For the same global pairs (all ranks' pairs together)
the shards end identical to one unsharded KGEdges, because an observe depends only on the
multiset of pairs it sees.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from arbd.model.kg_edges import KGEdges, neighbor_rows
from arbd.parallel.sharded_vq import shard_bounds
from arbd.sync_free import bin_counts


def _exchange(send: torch.Tensor, counts: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """all_to_all_single of rows of `send` (grouped by destination, counts[r] rows to rank r).
    Returns (received rows grouped by source, rows received from each rank)."""
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    rc, sc = torch.stack([recv_counts, counts]).tolist()   # the split sizes: one readback
    width = send.shape[1:]
    recv = send.new_empty((sum(rc), *width))
    scale = math.prod(width)
    dist.all_to_all_single(recv.reshape(-1), send.reshape(-1),
                           output_split_sizes=[n * scale for n in rc],
                           input_split_sizes=[n * scale for n in sc], group=group)
    return recv, recv_counts


class ShardedKGEdges(KGEdges):
    """A KGEdges holding the adjacency rows [global_start, global_stop) of a `total_nodes`-node
    graph: its buffers carry the same names as the whole graph's (checkpoints reshard by rows),
    its neighbour ids are global, and observe / neighbors are collectives over `group`."""

    def __init__(self, num_nodes: int, capacity: int, *, group=None,
                 shard_sizes: Sequence[int] | None = None, device=None) -> None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = shard_bounds(num_nodes, world, shard_sizes)
        super().__init__(bounds[rank + 1] - bounds[rank], capacity, device=device,
                         num_targets=num_nodes)
        self.group, self.world, self.rank = group, world, rank
        self.total_nodes, self.bounds = num_nodes, bounds
        self.global_start, self.global_stop = bounds[rank], bounds[rank + 1]
        self._bounds_t = torch.tensor(bounds[1:-1], dtype=torch.int64)
        self._bounds_on: dict[torch.device, torch.Tensor] = {}

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        b = self._bounds_on.get(ids.device)
        if b is None:   # copied once per device: a pageable copy waits for the queued work
            b = self._bounds_on[ids.device] = self._bounds_t.to(ids.device)
        return torch.searchsorted(b, ids, right=True)

    def _agree_valid(self, *ids: torch.Tensor) -> None:
        """Every rank learns whether any rank got out-of-range ids, before any data moves. The
        test and the agreement stay on the ids' device: one readback, however many tensors."""
        dev = ids[0].device
        flag = torch.zeros(1, dtype=torch.int64, device=dev)
        for t in ids:
            if t.numel():
                flag = flag | ((t.min() < 0) | (t.max() >= self.total_nodes)).to(torch.int64)
        bad = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        flag, bad = torch.cat([flag, bad]).tolist()
        if flag:
            raise ValueError(f"KG node ids must lie in [0, {self.total_nodes}) on every rank "
                             f"({'this' if bad else 'another'} rank sent ids out of range)")

    @torch.no_grad()
    def observe(self, src: torch.Tensor, dst: torch.Tensor, *, drop_self: bool = True) -> int:
        """Collective. Route each pair to its source's owner, which adds it to its rows."""
        src, dst = src.reshape(-1).long(), dst.reshape(-1).long()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must pair up, got {src.numel()} and {dst.numel()} ids")
        self._agree_valid(src, dst)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        owner = self.owner_of(src)
        order = torch.argsort(owner, stable=True)
        pairs = torch.stack([src[order], dst[order]], 1)
        counts = bin_counts(owner, self.world)
        recv, _ = _exchange(pairs, counts, self.group)
        if not recv.numel():
            return 0
        return super().observe(recv[:, 0] - self.global_start, recv[:, 1], drop_self=False)

    @torch.no_grad()
    def neighbors(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective. (neighbour ids int64 [n, capacity], weights int16) of `nodes`, fetched
        from their owners."""
        nodes = nodes.reshape(-1).long()
        self._agree_valid(nodes)
        uniq, inverse = torch.unique(nodes, sorted=True, return_inverse=True)
        owner = self.owner_of(uniq)                      # uniq is sorted, so owners are grouped
        counts = bin_counts(owner, self.world)
        asked, asked_counts = _exchange(uniq, counts, self.group)
        local = asked - self.global_start
        back, _ = _exchange(self.slots[local], asked_counts, self.group)   # in our send order
        return neighbor_rows(back[inverse])
