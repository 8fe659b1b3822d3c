"""MoEGraph (seed 14, section 6): ledger context + KG graph messages + an ACT loop of ternary experts.

    h -> h + ContextAttentionScheduler(h, ledger)               (KV ledger injection)
      -> h + node_proj(mean of active motifs' KG neighbours)    (graph message, active nodes only)
      -> ACT loop: top-k ternary experts, ternary halt gate, at most act_max_steps,
         each step computed for still-running positions only

Routing, dispatch and combine are separate methods so expert parallelism can replace dispatch
with an all-to-all without touching the rest.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import ARBConfig
from arbd.model.kg_edges import KGEdges
from arbd.model.ledger import ContextAttentionScheduler
from arbd.model.recompute import maybe_recompute
from arbd.sync_free import bin_counts
from arbd.ternary import TernaryLinear, TernaryRMSNorm, grouped

HALT_EPS = 0.01


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int, backend: str, generator) -> None:
        super().__init__()
        self.up = TernaryLinear(d, hidden, backend=backend, generator=generator)
        self.down = TernaryLinear(hidden, d, backend=backend, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


class MoEGraph(nn.Module):
    def __init__(self, cfg: ARBConfig, backend: str = "torch", generator=None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.use_moe, self.use_graph = cfg.use_moe, cfg.use_graph
        if cfg.use_graph:
            self.scheduler = ContextAttentionScheduler(d, generator=generator)
            self.node_proj = TernaryLinear(cfg.codebook_dim, d, backend=backend, generator=generator)
        if cfg.use_moe:
            # Keyed by global expert index: under expert parallelism a rank keeps only its own
            # experts, and names (checkpoints) stay those of the whole model.
            self.experts = nn.ModuleDict({str(e): Expert(d, cfg.expert_hidden, backend, generator)
                                          for e in range(cfg.n_experts)})
            self.router = TernaryLinear(d, cfg.n_experts, backend=backend, generator=generator)
            self.halt = TernaryLinear(d, 1, backend=backend, generator=generator)
            # Pre-norm for each ACT step and a final norm: repeated residual expert steps
            # otherwise grow the state several-fold per step, and the heads read this output.
            self.expert_norm = TernaryRMSNorm(d, cfg.norm_eps)
            self.out_norm = TernaryRMSNorm(d, cfg.norm_eps)
        self.top_k = cfg.moe_top_k
        self.n_experts = cfg.n_experts
        # Every ternary layer here sees a row count that changes from call to call: graph nodes,
        # running ACT positions, an expert's tokens (TernaryLinear.varying_rows).
        for layer in self.modules():
            if isinstance(layer, TernaryLinear):
                layer.varying_rows = True
        self.expert_parallel = False   # set by parallelize_moe
        # Set by ARBModel under activation checkpointing: the scheduler and each ACT step keep
        # only their inputs and run again in backward, one step at a time (the whole block's
        # ACT loop is the largest thing a recomputation would otherwise hold).
        self.recompute_steps = False
        self.offload_inputs = False   # ARBModel's activation_offload, for those regions

    # -- graph -------------------------------------------------------------------------------
    def graph_message(self, motif_ids: torch.Tensor, codebook, edges: KGEdges,
                      dtype: torch.dtype) -> torch.Tensor:
        """Weighted mean of each active motif's neighbour rows (plus its own), projected to d.

        `codebook` is anything with decode_rows(ids, dtype) (the shared VQ codebook, whole or
        row-sharded). The rows are read as constants: the graph learns its projection, the
        codebook learns from its own loss only, so a row-sharded codebook needs no evidence
        path for rows fetched here."""
        uniq, inverse = torch.unique(motif_ids, sorted=True, return_inverse=True)
        nbr, w = edges.neighbors(uniq)                                   # [U, cap]
        ids = torch.cat([uniq[:, None], nbr], 1)                         # own row first
        wts = torch.cat([torch.ones_like(uniq[:, None], dtype=torch.float32), w.float()], 1)
        valid = ids >= 0
        wts = torch.where(valid, wts, torch.zeros_like(wts))
        # Decode each distinct valid row once; empty slots read nothing.
        fetch, slot = torch.unique(ids[valid], sorted=True, return_inverse=True)
        with torch.no_grad():
            fetched = codebook.decode_rows(fetch, dtype)
        rows = torch.zeros(*ids.shape, fetched.shape[-1], dtype=dtype, device=ids.device)
        rows = rows.index_put((valid,), fetched[slot])
        agg = (rows * (wts / wts.sum(1, keepdim=True)).to(dtype)[..., None]).sum(1)
        return self.node_proj(agg)[inverse]

    # -- experts -----------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k expert ids and weights per row of x [N, d], and the load-balancing loss."""
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        # Switch-style balance: n_experts * sum_e (fraction routed to e) * (mean prob of e).
        frac = F.one_hot(top_i, self.n_experts).float().sum((0, 1)) / max(top_i.numel(), 1)
        balance = self.n_experts * (frac * probs.mean(0)).sum() if x.shape[0] else probs.sum()
        return top_i, top_w.to(x.dtype), balance

    def run_experts(self, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each row of `rows` through the expert `expert_ids` names (experts this module holds),
        in row order per expert. One stable sort groups the rows by expert and one read of the
        counts sizes the groups (one host synchronisation per call instead of one per expert;
        the step is bound by host launches, bench/RESULTS.md). `rows * 0`, not zeros_like: the
        result stays in the autograd graph even with no rows, so an expert-parallel backward
        enters every exchange."""
        if rows.shape[0] == 0:
            return rows * 0
        order = torch.argsort(expert_ids, stable=True)
        counts = bin_counts(expert_ids, self.n_experts).tolist()
        ffn = self.grouped_ffn(rows)
        if ffn is not None:   # every local expert at once (arbd/ternary/grouped.py says why)
            local = sorted(int(e) for e in self.experts)   # all, or this rank's block under EP
            y = ffn(rows[order], [counts[e] for e in local], [self.experts[str(e)] for e in local])
            return (rows * 0).index_copy(0, order, y)
        groups = rows[order].split(counts)
        outs = [self.experts[str(e)](group) for e, group in enumerate(groups) if group.shape[0]]
        return (rows * 0).index_copy(0, order, torch.cat(outs))

    def grouped_ffn(self, rows: torch.Tensor):
        """The experts' FFN for all local experts at once, as a callable (rows sorted by expert,
        rows per expert, experts) -> output rows, or None for the per-expert loop. Ternary
        experts: grouped.grouped_relu2_ffn where grouped.use_grouped allows."""
        up = next(iter(self.experts.values())).up
        if not (isinstance(up, TernaryLinear) and grouped.use_grouped(rows, up.backend)):
            return None
        return lambda x, counts, experts: grouped.grouped_relu2_ffn(
            x, counts, [e.up.weight for e in experts], [e.down.weight for e in experts], up.backend)

    def dispatch(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """Run each expert on its rows and combine (local version; EP swaps in all-to-all)."""
        flat_row = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        y = self.run_experts(x[flat_row], top_i.reshape(-1))
        return torch.zeros_like(x).index_add(0, flat_row, y * top_w.reshape(-1)[:, None])

    def keep_running(self, n_running: int) -> bool:
        """Whether the ACT loop goes on (expert parallelism makes this a collective decision,
        since every rank must take part in every dispatch)."""
        return n_running > 0

    def act_step(self, x: torch.Tensor, mass: torch.Tensor, last: bool):
        """One ACT step for the running rows x [R, d] with halted mass [R]: the new state, its
        weighted contribution to the output, the share, which rows stop, the balance loss."""
        xn = self.expert_norm(x)
        top_i, top_w, bal = self.route(xn)
        x = x + self.dispatch(xn, top_i, top_w)
        p = torch.sigmoid(self.halt(x).float()).squeeze(-1)
        # A position halts when its mass would pass 1 - eps, or at the step cap; it then
        # contributes its remainder, so contributions always sum to 1.
        stop = (mass + p > 1 - HALT_EPS) | torch.full_like(p, last, dtype=torch.bool)
        share = torch.where(stop, 1 - mass, p)
        return x, x * share.to(x.dtype)[:, None], share, stop, bal

    def act(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Adaptive computation over positions h [N, d]; halted positions are not recomputed."""
        n = h.shape[0]
        out = torch.zeros_like(h)
        halted_mass = torch.zeros(n, dtype=torch.float32, device=h.device)
        running = torch.arange(n, device=h.device)
        state = h
        steps = torch.zeros(n, dtype=torch.float32, device=h.device)
        balance = h.new_zeros((), dtype=torch.float32)
        routed_steps = 0   # steps with positions still running here (expert parallelism may
                           # run further, empty, steps for the other ranks of its group)
        for step in range(self.cfg.act_max_steps):
            x = state[running]
            routed_steps += int(x.shape[0] > 0)
            last = step == self.cfg.act_max_steps - 1
            x, part, share, stop, bal = maybe_recompute(
                self.recompute_steps and self.training, self.act_step, x, halted_mass[running], last,
                offload=self.offload_inputs)
            balance = balance + bal
            out = out.index_add(0, running, part)
            halted_mass = halted_mass.index_add(0, running, share)
            steps = steps.index_add(0, running, torch.ones_like(share))
            state = state.index_copy(0, running, x)
            running = running[~stop]
            if not self.keep_running(running.numel()):
                break
        aux = {"balance": balance / max(routed_steps, 1), "ponder": steps.mean()}
        return out, aux

    def forward(self, h: torch.Tensor, motif_ids: torch.Tensor | None = None,
                codebook=None, edges: KGEdges | None = None,
                ledger_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        aux: dict[str, torch.Tensor] = {}
        if self.use_graph:
            h = h + maybe_recompute(self.recompute_steps and self.training, self.scheduler, h,
                                    ledger_ids, offload=self.offload_inputs)
            if motif_ids is not None and codebook is not None and edges is not None:
                h = h + self.graph_message(motif_ids, codebook, edges, h.dtype)
        if self.use_moe:
            b, t, d = h.shape
            out, aux = self.act(h.reshape(b * t, d))
            h = self.out_norm(out.reshape(b, t, d))
        return h, aux
