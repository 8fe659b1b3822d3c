"""Data-parallel combination of ternary evidence, before the update.

Two ways, selectable (docs/decisions.md, "The ternary update rule"):

- `reduce_evidence_sign_votes`: every micro-batch's gradient has already become integer votes
  (rule.quantize_evidence, committed per micro-batch); ranks all-reduce the integer votes. The
  sum is exact in any order, so dp = W with micro-batch b ends each step bit-identical to dp = 1
  accumulating the same W micro-batches. Wire: int8 when W * max|local vote| <= 127 (else int16 /
  int32), i.e. 1 byte per weight; or `encoding="packed"` for ternary votes (|vote| <= 1): base-3
  packed, 5 votes per byte, all-gathered (0.2 byte per weight per rank) and summed locally.
- `reduce_evidence_summed`: ranks all-reduce the float gradients (bf16 on the wire by default,
  2 bytes per weight) and the rule quantises the sum once. Learns better per step in our
  measurement; exact only where the float sum is (two ranks, fp32 on the wire).

`DPEvidenceReducer` wraps either as the model's `ternary_evidence_reducer` and counts the bytes.
Sparse evidence (row ids + rows) is all-gathered and merged in rank order on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from arbd.ternary import packing
from arbd.ternary.rule import TernaryRule
from arbd.ternary.state import TernaryMatrix

Mats = list[tuple[str, TernaryMatrix]]


@dataclass
class WireStats:
    """Bytes handed to collectives by this rank (payload), over `calls` reductions."""
    calls: int = 0
    payload_bytes: int = 0
    weights: int = 0  # ternary weights covered per call (dense evidence)

    @property
    def bytes_per_weight_per_step(self) -> float:
        return self.payload_bytes / max(1, self.weights * self.calls)


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_reduce_flags(flags: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    return flags


def _all_gather_var(t: torch.Tensor, group) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs per rank (padded on the wire)."""
    w = _world(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    ns = [torch.zeros(1, dtype=torch.int64) for _ in range(w)]
    dist.all_gather(ns, n, group=group)
    ns = [int(x) for x in ns]
    m = max(ns)
    pad = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    outs = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(outs, pad, group=group)
    return [o[:k] for o, k in zip(outs, ns)]


def _vote_dtype(bound: int) -> torch.dtype:
    # No int16: gloo rejects it ("Invalid scalar type") and NCCL has no int16 reduction.
    return torch.int8 if bound <= 127 else torch.int32


def max_abs(tensors: list[torch.Tensor]) -> int:
    """max |t| over all entries of all tensors (0 if none), read back once per device: a
    readback per tensor would wait on the GPU once per matrix."""
    per_dev: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            per_dev.setdefault(t.device, []).append(t.abs().max().to(torch.int64))
    return max((int(torch.stack(ts).max()) for ts in per_dev.values()), default=0)


def reduce_evidence_sign_votes(mats: Mats, group=None, *, rule: TernaryRule | None = None,
                               encoding: str = "int8", stats: WireStats | None = None) -> None:
    """All-reduce each matrix's integer votes (and scale votes) over `group`.

    Pending float evidence is committed first with `rule` (this rank's micro-batch share); if
    there is pending float evidence and no rule, that is an error. A non-finite flag on any rank
    marks the step non-finite on every rank.
    """
    if encoding not in ("int8", "packed"):
        raise ValueError(f"encoding must be 'int8' or 'packed', got {encoding!r}")
    for _, m in mats:
        if m._grad is not None or m._row_grads:
            if rule is None:
                raise ValueError("float evidence is pending: commit micro-batches or pass rule=")
            m.commit_micro_batch(rule)
    w = _world(group)
    local_max = max_abs([t for _, m in mats for t in m.votes()[1:] if t is not None])
    # Agree on which matrices hold dense votes on some rank, the non-finite flags, and the bound.
    n = len(mats)
    info = torch.zeros(2 * n, dtype=torch.int64)
    for i, (_, m) in enumerate(mats):
        info[i] = int(m._votes is not None)
        info[n + i] = int(m._votes_nonfinite)
    flags = _all_reduce_flags(info, group)
    mx = torch.tensor([local_max], dtype=torch.int64)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    bound = int(mx) * w
    if encoding == "packed" and int(mx) > 1:
        raise ValueError(f"packed encoding carries votes in {{-1, 0, 1}}, got |vote| up to {int(mx)}")

    # Dense: one flat buffer for every matrix that has dense votes on some rank.
    order = [i for i in range(n) if int(flags[i]) > 0]
    bufs, shapes = [], []
    for i in order:
        m = mats[i][1]
        idx, v, e = m.votes()
        if v is None:
            v = torch.zeros(m.rows, m.cols, dtype=torch.int32, device=m.packed.device)
            e = torch.zeros(m.rows, dtype=torch.int32, device=m.packed.device)
        elif idx is not None:  # sparse here, dense on another rank: densify
            v = torch.zeros(m.rows, m.cols, dtype=torch.int32, device=v.device).index_add_(0, idx, v)
            e = torch.zeros(m.rows, dtype=torch.int32, device=e.device).index_add_(0, idx, e)
        bufs += [v.reshape(-1), e.reshape(-1)]
        shapes.append((m.rows, m.cols))
    if bufs:
        flat = torch.cat(bufs)
        if encoding == "int8":
            wire = flat.to(_vote_dtype(bound))
            dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
            total = wire.to(torch.int32)
            payload = wire.numel() * wire.element_size()
        else:
            packed = packing.pack_trits(flat.to(torch.int8))
            outs = [torch.empty_like(packed) for _ in range(w)]
            dist.all_gather(outs, packed, group=group)
            total = torch.zeros(flat.numel(), dtype=torch.int32, device=flat.device)
            for o in outs:  # rank order; integer sums are exact anyway
                total += packing.unpack_trits(o, flat.numel()).to(torch.int32)
            payload = packed.numel()
        if stats is not None:
            stats.payload_bytes += payload
            stats.weights = sum(r * c for r, c in shapes)
        off = 0
        for i, (r, c) in zip(order, shapes):
            m = mats[i][1]
            v = total[off:off + r * c].reshape(r, c)
            off += r * c
            e = total[off:off + r]
            off += r
            m.set_votes(None, v.clone(), e.clone(), nonfinite=int(flags[n + i]) > 0)
    # Sparse: all-gather (row ids, votes, scale votes) per matrix, merge in rank order.
    for i, (_, m) in enumerate(mats):
        if i in order:
            continue
        idx, v, e = m.votes()
        if idx is None:
            dv = m.packed.device
            idx = torch.zeros(0, dtype=torch.int64, device=dv)
            v = torch.zeros(0, m.cols, dtype=torch.int32, device=dv)
            e = torch.zeros(0, dtype=torch.int32, device=dv)
        ids = _all_gather_var(idx, group)
        vs = _all_gather_var(v, group)
        es = _all_gather_var(e, group)
        if stats is not None:
            stats.payload_bytes += idx.numel() * 8 + v.numel() * 4 + e.numel() * 4
        allid = torch.cat(ids)
        if allid.numel() == 0:
            m.clear_evidence()
            if int(flags[n + i]) > 0:
                m.mark_nonfinite()
            continue
        uniq, inv = torch.unique(allid, sorted=True, return_inverse=True)
        vv = torch.zeros(uniq.numel(), m.cols, dtype=torch.int32, device=allid.device).index_add_(
            0, inv, torch.cat(vs))
        ee = torch.zeros(uniq.numel(), dtype=torch.int32, device=allid.device).index_add_(
            0, inv, torch.cat(es))
        m.set_votes(uniq, vv, ee, nonfinite=int(flags[n + i]) > 0, distinct=True)
    if stats is not None:
        stats.calls += 1


def reduce_evidence_summed(mats: Mats, group=None, *, dtype: torch.dtype = torch.bfloat16,
                           stats: WireStats | None = None) -> None:
    """All-reduce each matrix's float evidence over `group` (in `dtype` on the wire); every rank
    then holds the same summed gradient and quantises it once in the update."""
    n = len(mats)
    info = torch.zeros(2 * n, dtype=torch.int64)
    for i, (_, m) in enumerate(mats):
        info[i] = int(m._grad is not None)
        info[n + i] = int(m._votes_nonfinite)
    if any(m.has_votes for _, m in mats):
        raise ValueError("summed reduction needs float evidence; votes were committed already")
    flags = _all_reduce_flags(info, group)
    order = [i for i in range(n) if int(flags[i]) > 0]
    bufs = []
    for i in order:
        m = mats[i][1]
        idx, g = m.evidence()
        if g is None:
            g = torch.zeros(m.rows, m.cols, device=m.packed.device)
        elif idx is not None:  # sparse here, dense on another rank: densify
            g = torch.zeros(m.rows, m.cols, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        bufs.append(g.reshape(-1))
    if bufs:
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # float64 runs stay exact
        flat = torch.cat([b.to(acc) for b in bufs]).to(dtype)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if stats is not None:
            stats.payload_bytes += flat.numel() * flat.element_size()
            stats.weights = flat.numel()
        total = flat.to(torch.float32 if dtype != torch.float64 else torch.float64)
        off = 0
        for i in order:
            m = mats[i][1]
            k = m.rows * m.cols
            m.set_evidence(None, total[off:off + k].reshape(m.rows, m.cols).clone())
            off += k
    for i, (_, m) in enumerate(mats):
        if i not in order:
            idx, g = m.evidence()
            if idx is None:
                idx = torch.zeros(0, dtype=torch.int64, device=m.packed.device)
                g = torch.zeros(0, m.cols, device=m.packed.device)
            ids = _all_gather_var(idx, group)
            gs = _all_gather_var(g.to(dtype), group)
            if stats is not None:
                stats.payload_bytes += idx.numel() * 8 + g.numel() * torch.empty(0, dtype=dtype).element_size()
            m.clear_evidence()
            allid = torch.cat(ids)
            if allid.numel():
                m.add_row_grad(allid, torch.cat(gs).to(torch.float64 if dtype == torch.float64
                                                        else torch.float32))
        if int(flags[n + i]) > 0:
            m.mark_nonfinite()
    if stats is not None:
        stats.calls += 1


class DPEvidenceReducer:
    """A `ternary_evidence_reducer` for the model: mode "votes" (integer sign votes) or
    "summed" (float gradients). Counts this rank's payload bytes in `self.stats`."""

    def __init__(self, group=None, mode: str = "summed", *, dtype: torch.dtype = torch.bfloat16,
                 encoding: str = "int8") -> None:
        if mode not in ("votes", "summed"):
            raise ValueError(f"mode must be 'votes' or 'summed', got {mode!r}")
        self.group, self.mode, self.dtype, self.encoding = group, mode, dtype, encoding
        self.wants_votes = mode == "votes"
        self.stats = WireStats()

    def __call__(self, mats: Mats) -> None:
        if self.mode == "votes":
            reduce_evidence_sign_votes(mats, self.group, encoding=self.encoding, stats=self.stats)
        else:
            reduce_evidence_summed(mats, self.group, dtype=self.dtype, stats=self.stats)


def ring_wire_bytes_per_weight(mode: str, world: int, *, dtype_bytes: int = 2) -> float:
    """Bytes each rank sends per weight per step with ring collectives: all-reduce moves
    2 (W-1)/W of the payload, all-gather (W-1)/W of the gathered total."""
    if world < 2:
        return 0.0
    if mode == "summed":
        return 2 * (world - 1) / world * dtype_bytes
    if mode == "votes_int8":
        return 2 * (world - 1) / world * 1.0
    if mode == "votes_packed":
        return (world - 1) / world * world * 0.2
    raise ValueError(f"unknown mode {mode!r}")
