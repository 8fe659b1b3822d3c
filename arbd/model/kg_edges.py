"""KG edges: a fixed-capacity adjacency per source motif with small integer weights.

Each row n holds up to `capacity` slots for motif n. A slot is one integer: the neighbour id in
the high bits and an 8-bit co-occurrence count in the low 8 bits; a count of 0 marks an empty
slot. Ids below 2**24 (the 10M shared codebook) fit an int32 slot; larger graphs get int64
slots. When a count would pass 255, every count of that row is halved (occupied slots keep at
least 1) until all fit: the weights' ratios, which the graph message uses, survive, and old
co-occurrences fade against new ones. Updates and reads touch only the rows of the source nodes
involved: nothing is proportional to the number of motifs, and no node x node matrix exists.
Row-sharding keeps a node's edges with the rank that owns the node's codebook row.
"""
from __future__ import annotations

import torch
from torch import nn

COUNT_BITS = 8
COUNT_MAX = (1 << COUNT_BITS) - 1
NARROW_IDS = 1 << 24          # neighbour ids below this fit an int32 slot


def slot_dtype(num_targets: int) -> torch.dtype:
    return torch.int32 if num_targets <= NARROW_IDS else torch.int64


def encode_slots(ids: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Slots of `dtype` from neighbour ids (-1 = empty) and counts in [1, COUNT_MAX]."""
    v = torch.where(ids >= 0, (ids.long() << COUNT_BITS) | counts.long(), torch.zeros_like(ids.long()))
    if dtype == torch.int32:   # ids up to 2**24 - 1 use the sign bit: wrap to int32 explicitly
        v = torch.where(v >= 1 << 31, v - (1 << 32), v)
    return v.to(dtype)


def decode_slots(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbour ids int64 with -1 for empty, counts int64) of slots of either dtype."""
    v = slots.long()
    mask = (NARROW_IDS if slots.dtype == torch.int32 else 1 << (63 - COUNT_BITS)) - 1
    counts = v & COUNT_MAX
    return ((v >> COUNT_BITS) & mask).masked_fill_(counts == 0, -1), counts


def neighbor_rows(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `neighbors` returns for these slot rows: ids (-1 for empty) and int16 weights."""
    ids, counts = decode_slots(slots)
    return ids, counts.to(torch.int16)


def age_rows(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Counts [R, cap] halved per row as often as its largest count needs to fit 8 bits;
    occupied slots keep at least 1, empty ones stay 0."""
    top = counts.max(1).values
    limits = (COUNT_MAX + 1) << torch.arange(0, 48, device=counts.device)
    shift = (top[:, None] >= limits).sum(1)           # smallest s with top >> s <= COUNT_MAX
    aged = counts >> shift[:, None]
    return torch.where(ids >= 0, aged.clamp_min(1), torch.zeros_like(aged))


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
        self.register_buffer("slots", torch.zeros(num_nodes, capacity, dtype=slot_dtype(self.num_targets),
                                                  device=device))
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's rows decoded: (neighbour ids int64 [num_nodes, capacity], -1 for
        empty; counts int64). Reads every row: for tests and inspection, not the training path."""
        return decode_slots(self.slots)

    def neighbors(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(neighbour ids int64 [U, capacity] with -1 for empty, weights int16) of `nodes`."""
        return neighbor_rows(self.slots[nodes])

    @torch.no_grad()
    def occupancy(self) -> torch.Tensor:
        """float64 [rows, rows with an edge, full rows, edges] of the rows held here, on their
        device so that shards can be summed. Says whether the fixed capacity binds: a full row
        replaces its weakest edge for every new neighbour."""
        used = (self.slots & COUNT_MAX) != 0
        per_row = used.sum(1)
        return torch.stack([torch.tensor(self.num_nodes, device=per_row.device), (per_row > 0).sum(),
                            (per_row == self.capacity).sum(), per_row.sum()]).double()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from before the packed slots hold `dst` (int32) and `weight` (int16):
        # convert them, aging rows whose counts exceed 8 bits.
        dst, weight = state_dict.pop(prefix + "dst", None), state_dict.pop(prefix + "weight", None)
        if dst is not None and weight is not None and prefix + "slots" not in state_dict:
            ids = dst.long()
            state_dict[prefix + "slots"] = encode_slots(ids, age_rows(ids, weight.long().clamp_min(0)),
                                                        self.slots.dtype)
        slots = state_dict.get(prefix + "slots")
        if slots is not None and slots.dtype == self.slots.dtype:
            # A neighbour id past the graph would fail much later, inside a codebook gather.
            ids = decode_slots(slots)[0]
            if ids.numel() and int(ids.max()) >= self.num_targets:
                error_msgs.append(f"{prefix}slots: neighbour id {int(ids.max())} is not below the "
                                  f"graph's {self.num_targets} nodes; the checkpoint is corrupt or "
                                  f"from a model with a larger shared codebook")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @torch.no_grad()
    def observe(self, src: torch.Tensor, dst: torch.Tensor, *, drop_self: bool = True) -> int:
        """Add one co-occurrence per (src[i], dst[i]) pair; self-pairs are ignored.

        An existing edge gains the pair count. A new edge takes an empty slot, else replaces the
        weakest edge of that row if the weakest is not stronger than the new count (ties broken
        by slot index, so the result is deterministic). Rows whose counts then pass 8 bits are
        aged (module docstring). Returns the number of rows touched.
        """
        src, dst = src.reshape(-1).long(), dst.reshape(-1).long()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must pair up, got {src.numel()} and {dst.numel()} ids")
        if src.numel() == 0:
            return 0
        # Few host readbacks (range check, the two uniques, the split below): on the GPU each
        # one waits for the device, and the update runs once per step.
        lo_s, hi_s, lo_d, hi_d = torch.stack([src.min(), src.max(), dst.min(), dst.max()]).tolist()
        if lo_s < 0 or hi_s >= self.num_nodes:
            raise ValueError(f"source node ids must lie in [0, {self.num_nodes})")
        if lo_d < 0 or hi_d >= self.num_targets:
            raise ValueError(f"node ids must lie in [0, {self.num_targets})")
        if drop_self:
            keep = src != dst
            src, dst = src[keep], dst[keep]
        n_t = self.num_targets
        keys, counts = torch.unique(src * n_t + dst, sorted=True, return_counts=True)
        if keys.numel() == 0:
            return 0
        s, d = keys // n_t, keys % n_t                     # sorted by source, then neighbour
        rows_touched, r = torch.unique_consecutive(s, return_inverse=True)
        ids, cnt = decode_slots(self.slots[rows_touched])  # [R, cap], edited then written back

        hit = ids[r] == d[:, None]
        has = hit.any(1)
        n_has = int(has.sum())
        perm = torch.sort((~has).int(), stable=True).indices   # existing edges first, key order
        # Existing edges: add the count ((row, slot) pairs are distinct: one slot per neighbour).
        ih = perm[:n_has]
        slot = hit[ih].int().argmax(1)
        cnt[r[ih], slot] += counts[ih]

        if n_has < keys.numel():
            inew = perm[n_has:]
            r_n, d_n, c_n = r[inew], d[inew], counts[inew]
            # Rank of each new pair within its source row (pairs are sorted by source).
            first = torch.searchsorted(r_n, r_n, right=False)
            rank = torch.arange(r_n.numel(), device=r_n.device) - first
            # Empty slots first (key -1), then occupied slots from weakest; stable on slot index.
            key = torch.where(ids[r_n] >= 0, cnt[r_n], torch.full_like(cnt[r_n], -1))
            order = torch.sort(key, dim=1, stable=True).indices
            target = order.gather(1, rank.clamp_max(self.capacity - 1)[:, None]).squeeze(1)
            key_t = key.gather(1, target[:, None]).squeeze(1)   # strength of the slot to take
            take = (rank < self.capacity) & (key_t <= c_n)
            ids[r_n[take], target[take]] = d_n[take]
            cnt[r_n[take], target[take]] = c_n[take]
        self.slots[rows_touched] = encode_slots(ids, age_rows(ids, cnt), self.slots.dtype)
        return rows_touched.numel()
