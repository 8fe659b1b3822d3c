"""Model-level update: collect evidence in backward, then one call moves trits and scales.

`apply_ternary_update` is the engine; `TernaryUpdateMixin._ternary_update_memory` is the entry
point the seeds' training scripts call (`loss_signal=` or `loss_components=`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from arbd.ternary.rule import TernaryRule
from arbd.ternary.state import TernaryMatrix, all_evidence_finite, update_fused

EvidenceReducer = Callable[[list[tuple[str, TernaryMatrix]]], None]


def ternary_matrices(model: nn.Module) -> list[tuple[str, TernaryMatrix]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryMatrix)]


def _is_evidence_owner(m: nn.Module) -> bool:
    return bool(getattr(m, "ternary_evidence_owner", False))


def _is_step_hook(m: nn.Module) -> bool:
    return callable(getattr(m, "on_ternary_step", None))


def evidence_owners(model: nn.Module) -> list[nn.Module]:
    """Modules that keep and apply their own ternary evidence (row-sharded codebooks: their
    updates are collective over the codebook group). They offer commit_micro_batch(rule),
    apply_update(rule) and clear_step_evidence()."""
    return [m for m in model.modules() if _is_evidence_owner(m)]


def step_hooks(model: nn.Module) -> list[nn.Module]:
    """Modules with `on_ternary_step(applied)`: state that changes once per step, after the
    update (KG edges observed during the step's forwards)."""
    return [m for m in model.modules() if _is_step_hook(m)]


def _model_parts(model: nn.Module) -> tuple[list[tuple[str, TernaryMatrix]], list[nn.Module], list[nn.Module]]:
    """(ternary_matrices, evidence_owners, step_hooks) of `model` in one walk over its modules
    (a walk over arb-small's ~1,000 modules costs ~1 ms of the host-bound update)."""
    mats, owners, hooks = [], [], []
    for name, m in model.named_modules():
        if isinstance(m, TernaryMatrix):
            mats.append((name, m))
        if _is_evidence_owner(m):
            owners.append(m)
        if _is_step_hook(m):
            hooks.append(m)
    return mats, owners, hooks


def clear_evidence(model: nn.Module) -> None:
    for _, m in ternary_matrices(model):
        m.clear_evidence()
    for owner in evidence_owners(model):
        owner.clear_step_evidence()


def commit_micro_batch(model: nn.Module, rule: TernaryRule, *, micro_batches: int = 1,
                       rate_mult: float = 1.0) -> None:
    """Quantise every matrix's float evidence of the micro-batch just back-propagated into
    integer votes (rule.py). Call after each micro-batch's backward when a step accumulates
    several; votes are summed exactly, so the order and the data-parallel layout do not matter.
    `micro_batches` is the number of micro-batches in the whole step (all dp ranks)."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    # A matrix whose one backward holds k micro-batches votes with k shares (experts under ep).
    rules: dict[int, TernaryRule] = {}
    on_gpu: dict[tuple, list] = {}   # (k, kernel group) -> (matrix, DenseItem)
    for _, m in ternary_matrices(model):
        k = m.micro_batches_per_commit
        if k not in rules:
            rules[k] = with_step_salt(rule.scaled(rate_mult * k / micro_batches), model)
        item = m.commit_item()
        if item is None:
            m.commit_micro_batch(rules[k])
        else:
            on_gpu.setdefault((k,) + _kernel_group(m, item), []).append((m, item))
    if on_gpu:
        _commit_on_gpu(on_gpu, rules)
    mb_rule = rules.get(1) or with_step_salt(rule.scaled(rate_mult / micro_batches), model)
    for owner in evidence_owners(model):
        owner.commit_micro_batch(mb_rule)


def _kernel_group(m: nn.Module, item: Any) -> tuple:
    """What matrices must share to go through one launch of the fused kernels: column count,
    device, evidence dtype, kind (whole matrices, touched rows, blocks with a given mean, column
    shards with given row sums) and state layout."""
    from arbd.ternary.triton_update import row_strides
    return (m.cols, item.grad.device, item.grad.dtype, item.row_ids is None,
            item.mean_ge is None, item.row_abs_sums is None, row_strides(item))


def _commit_on_gpu(groups: dict[tuple, list], rules: dict[int, TernaryRule]) -> None:
    """commit_micro_batch of the matrices that gave a DenseItem, grouped by (micro-batches per
    commit, _kernel_group): votes_many per group, one host read for all groups' finiteness
    instead of one per matrix. A group with non-finite evidence (a NaN loss) or whose kernel
    fails to compile commits matrix by matrix through the torch path."""
    from arbd.ternary.state import _kernel_or_none
    from arbd.ternary.triton_update import votes_many
    done, finite = [], []
    for key, pairs in groups.items():
        rule = rules[key[0]]
        out = _kernel_or_none(("votes", key[1]), lambda: votes_many([it for _, it in pairs], rule))
        if out is None:
            for m, _ in pairs:
                m.commit_micro_batch(rule)
            continue
        done.append((pairs, rule, out))
        finite.append(out[2].all())
    ok = torch.stack(finite).tolist() if finite else []
    for (pairs, rule, (votes, e_votes, _)), good in zip(done, ok):
        if not good:
            for m, _ in pairs:
                m.commit_micro_batch(rule)
            continue
        rows = [it.grad.shape[0] for _, it in pairs]
        for (m, it), q, ev in zip(pairs, votes.split(rows), e_votes.split(rows)):
            m.add_committed(it.row_ids, q, ev)


def with_step_salt(rule: TernaryRule, model: nn.Module) -> TernaryRule:
    """The rule salted with the model's step counter (`ternary_step`: updates applied so far,
    the same on every rank since skips are agreed collectively). The counter is a buffer, so
    checkpoints and re-partitioning carry it."""
    step = getattr(model, "ternary_step", None)
    return rule if step is None else replace(rule, salt=int(step))


def ternary_state_bytes(model: nn.Module) -> tuple[int, int]:
    """(persistent bytes of all ternary matrices, number of logical ternary weights)."""
    mats = [m for _, m in ternary_matrices(model)]
    return sum(m.state_bytes() for m in mats), sum(m.rows * m.cols for m in mats)


@dataclass
class UpdateStats:
    applied: int = 0
    skipped_nonfinite_loss: int = 0
    skipped_nonfinite_grad: int = 0
    trit_flips: int = 0
    scale_moves: int = 0
    last: dict = field(default_factory=dict)


def _is_finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x.detach()).all())
    return bool(torch.isfinite(torch.tensor(float(x))))


def apply_ternary_update(model: nn.Module, rule: TernaryRule, stats: UpdateStats, *,
                         losses: Iterable = (), rate_mult: float = 1.0,
                         reduce_evidence: EvidenceReducer | None = None,
                         micro_batches: int = 1) -> bool:
    """Apply one update to every TernaryMatrix of `model` that holds evidence.

    Any non-finite loss or evidence skips the step before a single buffer changes; the evidence
    is dropped either way (no stale gradients leak into the next step). Returns True if applied.

    If the step's evidence is being kept as integer votes (some matrix has votes already, or the
    reducer has `wants_votes`), float evidence still pending is committed as the step's last
    micro-batch first. With a reducer, a non-finite local loss still takes part in the reduction
    (its evidence is marked non-finite), so that every rank skips the same steps and none waits
    on a collective the others never enter. A reducer with an `update_matrices(mats, rule)`
    method applies the update itself (returning the step's total trit flips and scale moves).
    """
    mats, owners, hooks = _model_parts(model)
    rule = with_step_salt(rule, model)
    loss_ok = all(_is_finite(l) for l in losses)
    if not loss_ok and reduce_evidence is None:
        stats.skipped_nonfinite_loss += 1
        _skip(model, hooks)
        return False
    if getattr(reduce_evidence, "wants_votes", False) or any(m.has_votes for _, m in mats):
        commit_micro_batch(model, rule, micro_batches=micro_batches, rate_mult=rate_mult)
    if not loss_ok:
        for _, m in mats:
            m.mark_nonfinite()
    if reduce_evidence is not None:
        reduce_evidence(mats)
    if not all_evidence_finite([m for _, m in mats]):
        if loss_ok:
            stats.skipped_nonfinite_grad += 1
        else:
            stats.skipped_nonfinite_loss += 1
        _skip(model, hooks)
        return False
    step_rule = rule.scaled(rate_mult) if rate_mult != 1.0 else rule
    flips = moves = 0
    owner_update = getattr(reduce_evidence, "update_matrices", None)
    if owner_update is not None:
        # The reducer owns the update (ZeRO-partitioned accumulators, arbd/ternary/zero.py):
        # each rank applies the rule to its rows and the packed trits are all-gathered.
        s = owner_update(mats, step_rule)
        flips, moves = s["trit_flips"], s["scale_moves"]
    else:
        s = apply_updates(mats, step_rule)
        flips, moves = s["trit_flips"], s["scale_moves"]
    own = {"trit_flips": 0, "scale_moves": 0}
    for owner in owners:   # collective over each owner's group, in module order on every rank
        s = owner.apply_update(step_rule)
        own["trit_flips"] += s["trit_flips"]
        own["scale_moves"] += s["scale_moves"]
    total_counts = getattr(reduce_evidence, "total_counts", None)
    if total_counts is not None:   # each rank counted its share: add them up (one collective)
        s = total_counts({"trit_flips": flips, "scale_moves": moves}, own)
        flips, moves = s["trit_flips"], s["scale_moves"]
    else:
        flips, moves = flips + own["trit_flips"], moves + own["scale_moves"]
    for hook in hooks:
        hook.on_ternary_step(True)
    stats.applied += 1
    if isinstance(getattr(model, "ternary_step", None), torch.Tensor):
        model.ternary_step += 1   # a skipped step changes nothing, its salt included
    stats.trit_flips += flips
    stats.scale_moves += moves
    stats.last = {"trit_flips": flips, "scale_moves": moves}
    return True


def apply_updates(mats: list[tuple[str, nn.Module]], rule: TernaryRule) -> dict[str, int]:
    """apply_update on every matrix that has evidence; the total trit flips and scale moves.

    Matrices the fused GPU update can take are updated together, a few launches per column
    count (triton_update.dense_update_many), the others one by one. Counts stay on the device
    and are read once at the end: one synchronisation per step, and the host issues the whole
    update without waiting (it is host-bound otherwise)."""
    flips = moves = 0
    fused, single = [], []
    for _, m in mats:
        if not m.has_evidence:
            continue
        item = m.fused_update_item() if m.tp_shard is None else m.fused_tp_item(rule)
        if item is None:
            single.append(m)
        else:
            fused.append((m, item))
    on_device, failed = update_fused_grouped(fused, rule)
    single.extend(failed)   # the kernel does not compile here: the torch rule, per matrix
    for m in single:
        s = m.apply_update(rule, counts_on_device=True)
        if "counts" in s:
            on_device.append(s["counts"])
        else:
            flips += s["trit_flips"]
            moves += s["scale_moves"]
    if on_device:
        f, mv = torch.stack(on_device).sum(0, dtype=torch.int64).tolist()
        flips, moves = flips + f, moves + mv
    return {"trit_flips": flips, "scale_moves": moves}


def update_fused_grouped(pairs: list[tuple[nn.Module, Any]], rule: TernaryRule
                         ) -> tuple[list[torch.Tensor], list[nn.Module]]:
    """Run the fused GPU update on (matrix, triton_update.DenseItem) pairs, a few launches per
    group of one column count, evidence dtype, kind (whole matrices, touched rows, blocks with
    a given mean, column shards with given row sums) and state layout. Returns the groups'
    int32 [2] counts (on the device) and the matrices whose kernel does not compile here
    (nothing of theirs was changed)."""
    if not pairs:
        return [], []
    groups: dict[tuple, list] = {}
    for m, item in pairs:
        groups.setdefault(_kernel_group(m, item), []).append((m, item))
    counts, failed = [], []
    for members in groups.values():
        c = update_fused(members, rule)
        if c is None:
            failed.extend(m for m, _ in members)
        else:
            counts.append(c)
    return counts, failed


def apply_updates_counted(mats: list[tuple[str, nn.Module]], rule: TernaryRule,
                          counted: Callable[[nn.Module], bool]) -> dict[str, int]:
    """apply_updates on every matrix, returning the trit flips and scale moves of those `counted`
    names only (a rank's share of state that other ranks update too). The two sets update in
    separate calls: a fused launch counts all its matrices together."""
    apply_updates([(n, m) for n, m in mats if not counted(m)], rule)
    return apply_updates([(n, m) for n, m in mats if counted(m)], rule)


def _skip(model: nn.Module, hooks: list[nn.Module]) -> None:
    clear_evidence(model)
    for hook in hooks:
        hook.on_ternary_step(False)


class TernaryUpdateMixin:
    """Gives an nn.Module the seeds' `_ternary_update_memory` entry point.

    The module sets `self.ternary_rule`; counters live in `self.ternary_stats`.
    """

    ternary_rule: TernaryRule = TernaryRule()
    ternary_rate_mult: float = 1.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Update calls so far; salts the rounding hash (rule.py), saved with the weights.
        self.register_buffer("ternary_step", torch.zeros((), dtype=torch.int64))
    ternary_evidence_reducer: EvidenceReducer | None = None
    ternary_micro_batches: int = 1  # micro-batches per step over all dp ranks (vote share)

    @property
    def ternary_stats(self) -> UpdateStats:
        if "_ternary_stats" not in self.__dict__:
            self.__dict__["_ternary_stats"] = UpdateStats()
        return self.__dict__["_ternary_stats"]

    def _ternary_update_memory(self, loss_signal=None,
                               loss_components: Mapping[str, torch.Tensor] | None = None,
                               **_ignored) -> bool:
        """Apply the ternary update for the evidence collected since the last call.

        loss_signal: the step's loss (tensor or float); loss_components: named partial losses.
        If backward has not run yet and the loss carries a graph, backward runs here on the
        (summed) loss. Non-finite losses are skipped and counted; returns True if applied.
        """
        if loss_signal is None and not loss_components:
            raise ValueError("_ternary_update_memory needs loss_signal=... or loss_components={...}")
        losses = list(loss_components.values()) if loss_components else [loss_signal]
        total = sum(losses) if loss_components else loss_signal
        have_evidence = any(m.has_evidence for _, m in ternary_matrices(self))
        if (not have_evidence and isinstance(total, torch.Tensor) and total.requires_grad
                and all(_is_finite(l) for l in losses)):
            total.backward()
        return apply_ternary_update(self, self.ternary_rule, self.ternary_stats, losses=losses,
                                    rate_mult=self.ternary_rate_mult,
                                    reduce_evidence=self.ternary_evidence_reducer,
                                    micro_batches=self.ternary_micro_batches)
