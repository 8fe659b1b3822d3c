"""KG edges: a fixed-capacity adjacency per source motif with integer weights.

dst[n, :] holds up to `capacity` neighbour ids of motif n (-1 = empty slot) and weight[n, :] their
co-occurrence counts (int16, saturating). Updates and reads touch only the rows of the source
nodes involved: nothing is proportional to the number of motifs, and no node x node matrix
exists. Row-sharding keeps a node's edges with the rank that owns the node's codebook row.
"""
from __future__ import annotations

import torch
from torch import nn

WEIGHT_MAX = 32767


class StagedObservations:
    """Pairs seen during a step's forwards are staged and observed once, after the step's
    update (`on_ternary_step`, called by apply_ternary_update). Every forward of a step thus
    reads the graph as it stood at the step's start, however the step's micro-batches are
    spread over data-parallel ranks, and one observe call sees the whole step's pairs."""

    def stage(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        src, dst = src.detach().reshape(-1).long(), dst.detach().reshape(-1).long()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must pair up, got {src.numel()} and {dst.numel()} ids")
        self._staged.append((src, dst))

    def clear_staged(self) -> None:
        self._staged = []

    def on_ternary_step(self, applied: bool) -> None:
        staged, self._staged = self._staged, []
        if not applied:
            return
        empty = torch.zeros(0, dtype=torch.long, device=next(self.buffers()).device)
        src = torch.cat([s for s, _ in staged]) if staged else empty
        dst = torch.cat([d for _, d in staged]) if staged else empty
        self.observe(src, dst)


class KGEdges(StagedObservations, nn.Module):
    """num_nodes source rows; neighbour ids lie in [0, num_targets) (default num_nodes). A row
    shard of a larger graph holds few source rows but global neighbour ids (arbd/parallel/sharded_kg.py)."""

    def __init__(self, num_nodes: int, capacity: int, device=None, *,
                 num_targets: int | None = None) -> None:
        super().__init__()
        if num_nodes <= 0 or capacity <= 0:
            raise ValueError(f"KGEdges needs positive num_nodes and capacity, got {num_nodes}, {capacity}")
        self.num_nodes, self.capacity = num_nodes, capacity
        self.num_targets = num_nodes if num_targets is None else num_targets
        self.register_buffer("dst", torch.full((num_nodes, capacity), -1, dtype=torch.int32, device=device))
        self.register_buffer("weight", torch.zeros(num_nodes, capacity, dtype=torch.int16, device=device))
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def neighbors(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(neighbour ids int64 [U, capacity] with -1 for empty, weights int16) of `nodes`."""
        return self.dst[nodes].long(), self.weight[nodes]

    @torch.no_grad()
    def observe(self, src: torch.Tensor, dst: torch.Tensor, *, drop_self: bool = True) -> int:
        """Add one co-occurrence per (src[i], dst[i]) pair; self-pairs are ignored.

        An existing edge gains the pair count. A new edge takes an empty slot, else replaces the
        weakest edge of that row if the weakest is not stronger than the new count (ties broken
        by slot index, so the result is deterministic). Returns the number of rows touched.
        """
        src, dst = src.reshape(-1).long(), dst.reshape(-1).long()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must pair up, got {src.numel()} and {dst.numel()} ids")
        if src.numel() == 0:
            return 0
        # Few host readbacks (range check, unique, the split below, the new edges taken): on
        # the GPU each one waits for the device, and the update runs once per step.
        lo_s, hi_s, lo_d, hi_d = torch.stack([src.min(), src.max(), dst.min(), dst.max()]).tolist()
        if lo_s < 0 or hi_s >= self.num_nodes:
            raise ValueError(f"source node ids must lie in [0, {self.num_nodes})")
        if lo_d < 0 or hi_d >= self.num_targets:
            raise ValueError(f"node ids must lie in [0, {self.num_targets})")
        n_t = self.num_targets
        keys = src * n_t + dst
        if drop_self:   # self-pairs become key -1: sorted first by unique, then ignored
            keys = torch.where(src != dst, keys, torch.full_like(keys, -1))
        keys, counts = torch.unique(keys, sorted=True, return_counts=True)
        valid = keys >= 0
        s = torch.where(valid, keys // n_t, 0)
        d = torch.where(valid, keys % n_t, -2)          # -2 matches no slot (empty is -1)
        counts = counts.clamp_max(WEIGHT_MAX).to(torch.int32)

        rows = self.dst[s].long()                       # [P, cap]
        hit = rows == d[:, None]
        has = hit.any(1)
        slot = hit.int().argmax(1)
        # Pairs by kind (0: existing edge, 1: new edge, 2: a dropped self-pair), in key order
        # within each kind; the source rows touched, counted in the same readback.
        kind = torch.where(has, 0, torch.where(valid, 1, 2))
        perm = torch.sort(kind, stable=True).indices
        fresh = valid.clone()   # the first valid pair of each source row (the -1 key sorts first)
        fresh[1:] &= (s[1:] != s[:-1]) | ~valid[:-1]
        n_has, n_new, _, touched = torch.cat([torch.bincount(kind, minlength=3),
                                              fresh.sum().reshape(1)]).tolist()
        # Existing edges: add the count ((row, slot) pairs are distinct: one slot per neighbour).
        ih = perm[:n_has]
        old = self.weight[s[ih], slot[ih]].int()
        self.weight[s[ih], slot[ih]] = (old + counts[ih]).clamp_max(WEIGHT_MAX).to(torch.int16)

        if n_new:
            inew = perm[n_has:n_has + n_new]
            s_n, d_n, c_n = s[inew], d[inew], counts[inew]
            # Rank of each new pair within its source row (pairs are sorted by source).
            first = torch.searchsorted(s_n, s_n, right=False)
            rank = torch.arange(s_n.numel(), device=s_n.device) - first
            w = self.weight[s_n].int()
            occupied = self.dst[s_n] >= 0
            # Empty slots first (key -1), then occupied slots from weakest; stable on slot index.
            key = torch.where(occupied, w, torch.full_like(w, -1))
            order = torch.sort(key, dim=1, stable=True).indices
            target = order.gather(1, rank.clamp_max(self.capacity - 1)[:, None]).squeeze(1)
            key_t = key.gather(1, target[:, None]).squeeze(1)   # strength of the slot to take
            it = ((rank < self.capacity) & (key_t <= c_n)).nonzero().squeeze(1)
            self.dst[s_n[it], target[it]] = d_n[it].to(torch.int32)
            self.weight[s_n[it], target[it]] = c_n[it].to(torch.int16)
        return touched
