"""MoEGraph expert parallelism: experts split over the ep group, tokens moved with all-to-all.

Rank i of an ep group of size P keeps experts [i*E/P, (i+1)*E/P). Each dispatch (one per ACT
step):

1. every (token, expert) assignment of the rank's top-k routing is sent to the expert's owner,
   ordered by owner and, within an owner, in the local (token, k) order;
2. owners run each of their experts on the rows they received, source rank by source rank,
   which is the order one rank would see for the concatenated batch of the group;
3. outputs return by the reverse all-to-all and are combined with the routing weights.

Backward runs the same two exchanges in reverse (the all-to-all's gradient is the transposed
all-to-all), so the experts' ternary evidence is collected on their owners.

Why our own dispatcher over `all_to_all_single` rather than DeepSpeed's MoE layer: DeepSpeed's
layer owns the gate and the experts as float modules, pads every expert to a fixed capacity and
drops overflow tokens; MoEGraph's router, its ACT loop (a different set of running tokens at
every step) and ternary experts stay as they are here, and no token is dropped: the exchange
carries exactly the assignments (uneven split sizes), so EP = P equals EP = 1 under the same
routing. The cost is a small count exchange before each payload (docs/decisions.md).
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn

from arbd.model.moegraph import MoEGraph
from arbd.sync_free import bin_counts
from arbd.ternary.state import TernaryMatrix


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((sum(ctx.send),) + tuple(g.shape[1:]))
        dist.all_to_all_single(out, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single with uneven split sizes along dim 0."""
    return _AllToAll.apply(x, send, recv, group)


def expert_block(n_experts: int, ep: int, index: int) -> tuple[int, int]:
    per = n_experts // ep
    return index * per, (index + 1) * per


class ExpertParallelDispatch:
    """Replaces MoEGraph.dispatch on an expert-parallel rank (see the module docstring)."""

    def __init__(self, moe: MoEGraph, group, ep: int) -> None:
        # Weak: moe owns this object as its dispatch, and a strong back-reference would form a
        # cycle that keeps the model and `group` alive after their last user lets go, until the
        # cyclic GC runs (possibly only at interpreter exit, with gloo's threads still running).
        self._moe = weakref.ref(moe)
        self.group, self.ep = group, ep
        self.per_rank = moe.n_experts // ep
        self.stats = {"dispatches": 0, "rows_sent": 0, "bytes_sent": 0}

    @property
    def moe(self) -> MoEGraph:
        return self._moe()

    def __call__(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        k = top_i.shape[1] if top_i.dim() == 2 else 1
        flat_e = top_i.reshape(-1)
        flat_row = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        owner = torch.div(flat_e, self.per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send = bin_counts(owner, self.ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_l, recv_l = torch.stack([send, recv]).tolist()   # the split sizes: one readback
        # Which expert each received row is for (no gradient), then the rows themselves.
        e_recv = torch.empty(sum(recv_l), dtype=flat_e.dtype, device=x.device)
        dist.all_to_all_single(e_recv, flat_e[order].contiguous(), recv_l, send_l, group=self.group)
        rows = all_to_all(x[flat_row[order]], send_l, recv_l, self.group)
        back = all_to_all(self.moe.run_experts(rows, e_recv), recv_l, send_l, self.group)
        self.stats["dispatches"] += 1
        sent = sum(send_l) - send_l[dist.get_rank(self.group)]
        self.stats["rows_sent"] += sent
        self.stats["bytes_sent"] += 2 * sent * x.shape[1] * x.element_size()
        out = torch.zeros_like(x)
        return out.index_add(0, flat_row[order], back * top_w.reshape(-1)[order, None])


def _any_running(group):
    def keep_running(n_running: int) -> bool:
        flag = torch.tensor([int(n_running > 0)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag)
    return keep_running


def parallelize_moe(moe: MoEGraph, group, ep: int, ep_index: int) -> None:
    """Keep this rank's block of experts and route tokens to their owners over `group`."""
    if not moe.use_moe or ep == 1:
        return
    if moe.n_experts % ep:
        raise ValueError(f"expert parallel size {ep} must divide the {moe.n_experts} experts; "
                         f"choose ep in {[d for d in range(1, moe.n_experts + 1) if moe.n_experts % d == 0]}")
    if len(moe.experts) != moe.n_experts:
        raise RuntimeError("this MoEGraph is expert-parallel already")
    lo, hi = expert_block(moe.n_experts, ep, ep_index)
    moe.experts = nn.ModuleDict({str(e): moe.experts[str(e)] for e in range(lo, hi)})
    for m in moe.experts.modules():
        if isinstance(m, TernaryMatrix):   # one backward holds the ep group's micro-batches
            m.micro_batches_per_commit = ep
    moe.dispatch = ExpertParallelDispatch(moe, group, ep)
    moe.keep_running = _any_running(group)
    moe.expert_parallel = True


def is_expert_matrix(name: str) -> bool:
    """Whether a ternary matrix (by its module name) belongs to a MoEGraph expert."""
    return ".experts." in f".{name}"
