"""The optimizer DeepSpeed drives: AdamW for the few float parameters, then the ternary update.

DeepSpeed calls `step()` once per gradient-accumulation boundary, after it has reduced the float
gradients over the data-parallel group (and partitioned them under ZeRO). Here the ternary
evidence collected by every micro-batch's backward is reduced over the same group and applied.
A non-finite micro-batch loss, non-finite evidence or a non-finite float gradient skips the
whole step on every rank (the flags travel with the evidence reduction), so ranks stay in
lockstep and no state changes.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from arbd.ternary import apply_ternary_update
from arbd.ternary.update import commit_micro_batch


class TernaryOptimizer(torch.optim.AdamW):
    def __init__(self, params: Iterable, model: nn.Module, *, lr: float = 1e-3,
                 weight_decay: float = 0.0, micro_batches: int = 1,
                 rate_schedule: Callable[[int], float] | None = None) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.model = model
        self.micro_batches = micro_batches
        self.rate_schedule = rate_schedule or (lambda step: 1.0)
        self.pending_losses: list[float] = []
        self.steps = 0

    def record_loss(self, loss: torch.Tensor) -> None:
        """The trainer reports each micro-batch loss; the step checks them all."""
        self.pending_losses.append(float(loss.detach()))

    def end_micro_batch(self) -> None:
        """After a micro-batch's backward: with integer votes, quantise its evidence now, so each
        micro-batch votes on its own (the per-micro-batch share of the rule)."""
        m = self.model
        if getattr(m.ternary_evidence_reducer, "wants_votes", False):
            commit_micro_batch(m, m.ternary_rule, micro_batches=self.micro_batches,
                               rate_mult=self.rate_schedule(self.steps + 1))

    def _float_grads_finite(self) -> bool:
        return all(p.grad is None or bool(torch.isfinite(p.grad).all())
                   for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure=None):
        m = self.model
        if not self.pending_losses:
            # No micro-batch since the last step: not a training step. (DeepSpeed's bf16
            # wrapper calls step() once inside deepspeed.initialize; counting it would move the
            # step counter, the rounding salt and the rate schedule one step ahead.) Every rank
            # takes this branch together, so no collective is skipped on one rank only.
            return False
        losses = self.pending_losses
        if not self._float_grads_finite():
            losses = losses + [math.nan]
        self.pending_losses = []
        applied = apply_ternary_update(m, m.ternary_rule, m.ternary_stats, losses=losses,
                                       rate_mult=self.rate_schedule(self.steps + 1),  # schedules count from 1
                                       reduce_evidence=m.ternary_evidence_reducer,
                                       micro_batches=self.micro_batches)
        self.steps += 1
        if applied:
            super().step(closure)
        return applied
