"""Apply the mesh to a plain ARBModel (torchtitan style: the model knows nothing of ranks).

`parallelize(model, mesh)` does, in order:
1. tensor parallelism for the MLA heads over the tp group (tensor_parallel.py);
2. expert parallelism for the MoEGraph experts over the ep group (expert_parallel.py);
3. row-sharded codebooks (shared VQ, KG VQ) and KG edges over the codebook group, replacing the
   whole ones (same hash seeds: a shard's rows are those rows of the whole table);
and `ParallelReducer(model, mesh, ...)` then becomes the model's ternary evidence reducer
(ZeRO over dp, see below).

Who reduces which ternary evidence (ParallelReducer):
- dense matrices replicated over dp (everything but experts and codebooks): over the dp group,
  ZeRO-partitioned when the stage is >= 1 (tensor-parallel shards too: each rank then keeps the
  accumulators of 1/(tp*dp) of an MLA matrix; a row block completes its row statistics over the
  tp group, see TernaryMatrix.quantize);
- expert matrices: over the expert-data-parallel group (the ranks holding the same experts);
  their owners already hold the evidence of every token of their ep group;
- codebooks and KG edges: their owners apply the update (collective over the codebook group).
  Ranks of one tp group see the same batch, so only tp index 0 contributes codebook evidence,
  usage and KG pairs; the others drop theirs before the update.
A non-finite value anywhere makes every rank of the world skip the step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from arbd.model.arb import ARBModel
from arbd.parallel.expert_parallel import is_expert_matrix, parallelize_moe
from arbd.parallel.mesh import Mesh
from arbd.parallel.sharded_kg import ShardedKGEdges
from arbd.parallel.sharded_vq import ShardedTernaryVQCodebook
from arbd.parallel.tensor_parallel import parallelize_attention
from arbd.ternary.dp import DPEvidenceReducer
from arbd.ternary.rule import TernaryRule
from arbd.ternary.state import TernaryMatrix, all_evidence_finite
from arbd.ternary.update import apply_updates, apply_updates_counted, evidence_owners
from arbd.ternary.zero import make_ternary_reducer
from arbd.vq.codebook import TernaryVQCodebook

Mats = list[tuple[str, TernaryMatrix]]


def _sharded_twin(cb: TernaryVQCodebook, group) -> ShardedTernaryVQCodebook:
    return ShardedTernaryVQCodebook(
        cb.num_codes, cb.dim, group=group, semantics="micro", candidate_count=cb.candidate_count,
        exact_max=cb.exact_max, cell_size=cb.cell_size, beta=cb.beta, hash_seed=cb.hash_seed,
        max_chunk_bytes=cb.max_chunk_bytes, check_finite=cb.check_finite,
        device=cb.matrix.packed.device, state_layout=cb.matrix.layout)


def shard_codebooks(model: ARBModel, group) -> None:
    """Replace the shared VQ codebook, the KG VQ codebook and the KG edges by row-sharded twins."""
    if model.shared_vq is not None:
        model.shared_vq.codebook = _sharded_twin(model.shared_vq.codebook, group)
    if model.composite is not None:
        model.composite.kgvq = _sharded_twin(model.composite.kgvq, group)
    if model.kg_edges is not None:
        e = model.kg_edges
        model.kg_edges = ShardedKGEdges(e.num_targets, e.capacity, group=group, device=e.slots.device)


class ParallelReducer:
    """The model's ternary evidence reducer under a mesh (module docstring)."""

    def __init__(self, model: ARBModel, mesh: Mesh, *, zero_stage: int, mode: str,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.model, self.mesh = model, mesh
        self.owners = evidence_owners(model)
        self.owned = {id(m) for o in self.owners for m in o.modules() if isinstance(m, TernaryMatrix)}
        # The ZeRO stage picks the dp reducer (stage 0: all-reduce, >= 1: partitioned rows).
        self.dp = make_ternary_reducer(
            model, mesh.dp_group, zero_stage=zero_stage, mode=mode, dtype=dtype,
            partition=lambda name, m: not is_expert_matrix(name))
        expert_world = dist.get_world_size(mesh.expert_dp_group)
        self.experts = DPEvidenceReducer(mesh.expert_dp_group, mode=mode, dtype=dtype) \
            if expert_world > 1 else None
        self.wants_votes = mode == "votes"
        model.ternary_evidence_reducer = self

    def _split(self, mats: Mats) -> tuple[Mats, Mats]:
        dense = [(n, m) for n, m in mats if id(m) not in self.owned and not is_expert_matrix(n)]
        experts = [(n, m) for n, m in mats if is_expert_matrix(n)]
        return dense, experts

    def __call__(self, mats: Mats) -> None:
        dense, experts = self._split(mats)
        self.dp(dense)
        if self.experts is not None:
            self.experts(experts)
        if self.mesh.tp_index != 0:
            # The tp group's batch is contributed once, by tp index 0.
            for owner in self.owners:
                owner.clear_step_evidence()
            if self.model.kg_edges is not None:
                self.model.kg_edges.clear_staged()
        bad = not all_evidence_finite([m for _, m in dense + experts]) \
            or any(o.step_nonfinite for o in self.owners)
        flag = torch.tensor([int(bad)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag):
            for _, m in mats:
                m.mark_nonfinite()

    def update_matrices(self, mats: Mats, rule: TernaryRule) -> dict[str, int]:
        """Update the dense matrices (ZeRO blocks or replicated) and this rank's experts. The
        counts returned are this rank's share only (see `counted`); `total_counts` adds them
        up over the world once the codebook owners have updated too."""
        dense, experts = self._split(mats)
        tp0 = self.mesh.tp_index == 0
        if hasattr(self.dp, "update_matrices"):   # ZeRO
            total = dict(self.dp.update_matrices(dense, rule, counted=self.counted))
        else:   # replicated over dp: counted on dp index 0
            total = apply_updates_counted(dense, rule, lambda m: self.counted(m, False))
        # Experts are replicated over their expert-dp group and over tp.
        s = apply_updates(experts, rule)
        if tp0 and dist.get_rank(self.mesh.expert_dp_group) == 0:
            total["trit_flips"] += s["trit_flips"]
            total["scale_moves"] += s["scale_moves"]
        return total

    def counted(self, m: TernaryMatrix, partitioned: bool) -> bool:
        """Whether this rank counts a dense matrix's trit flips: each dp rank counts its own
        ZeRO block, replicated matrices count on dp index 0, and a matrix that tensor
        parallelism did not split counts on tp index 0 only."""
        return (partitioned or self.mesh.dp_index == 0) and \
            (m.tp_shard is not None or self.mesh.tp_index == 0)

    def total_counts(self, matrices: dict[str, int], owners: dict[str, int]) -> dict[str, int]:
        """The whole model's trit flips and scale moves from every rank's share: the counts of
        `update_matrices`, and the codebook owners' (each owns distinct rows of its codebook
        group; the first group counts)."""
        cb = self.mesh.layout.cb or dist.get_world_size()
        mine = dist.get_rank() < cb
        t = torch.tensor([matrices["trit_flips"] + owners["trit_flips"] * mine,
                          matrices["scale_moves"] + owners["scale_moves"] * mine], dtype=torch.int64)
        dist.all_reduce(t)
        return {"trit_flips": int(t[0]), "scale_moves": int(t[1])}


class VotesOnOneRank:
    """The evidence reducer of a one-rank run whose plan asks for integer votes: nothing to
    reduce, but `wants_votes` makes every micro-batch quantise its own evidence
    (update.commit_micro_batch), as on every rank of a larger world, so that the one-rank run
    is the reference a dp > 1 run is compared with."""

    wants_votes = True

    def __call__(self, mats: Mats) -> None:
        pass


def parallelize(model: ARBModel, mesh: Mesh) -> None:
    """Split `model` over `mesh` in place (steps 1-3 of the module docstring). Call on a freshly
    built whole model; then load a checkpoint (this rank's boxes), then install the reducer with
    `ParallelReducer(model, mesh, ...)`, which partitions the accumulators (ZeRO)."""
    lay = mesh.layout
    if model.layers is not None and lay.tp > 1:
        parallelize_attention(model.layers, mesh.tp_group, lay.tp, mesh.tp_index)
    if model.moegraph is not None and lay.ep > 1:
        parallelize_moe(model.moegraph, mesh.ep_group, lay.ep, mesh.dp_index % lay.ep)
    if dist.get_world_size(mesh.cb_group) > 1:
        shard_codebooks(model, mesh.cb_group)
