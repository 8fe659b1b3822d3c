"""The accumulator rule: integer evidence in, trit and scale moves out.

No float latent weight exists. Each trit has an int8 accumulator; each row's int8 log scale has
an int8 accumulator of its own. An update turns the float gradient with respect to the decoded
weight into small integer evidence, adds it to the accumulators, and moves a trit one step (and
its accumulator back by the threshold) when the accumulator crosses +-threshold. docs/decisions.md
explains the choices; [ternary-rule] tunes the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from arbd.config import SCALE_K
from arbd.ternary.packing import exponent_to_scale

ACC_MAX = 127  # accumulators are int8


@dataclass(frozen=True)
class TernaryRule:
    threshold: int = 12          # accumulator units per trit step
    evidence_rate: float = 3.0   # mean |evidence| per weight per update, in accumulator units
    norm: str = "row"            # evidence normalised per output row ("row") or per tensor
    decay_shift: int = 0         # >0: accumulators lose acc / 2**shift each update (forgetting)
    learn_scales: bool = True
    scale_threshold: int = 6     # scale-accumulator units per exponent step
    scale_rate: int = 1          # scale evidence is the sign of dL/dE times this

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= ACC_MAX:
            raise ValueError(f"threshold must be in 1..{ACC_MAX}, got {self.threshold}")
        if self.norm not in ("row", "tensor"):
            raise ValueError(f"norm must be 'row' or 'tensor', got {self.norm!r}")
        if not 1 <= self.scale_threshold <= ACC_MAX:
            raise ValueError(f"scale_threshold must be in 1..{ACC_MAX}, got {self.scale_threshold}")
        if self.evidence_rate < 0 or self.decay_shift < 0 or self.scale_rate < 0:
            raise ValueError("evidence_rate, decay_shift and scale_rate must be >= 0")

    def scaled(self, rate_mult: float) -> "TernaryRule":
        """The same rule with the evidence rate multiplied (a schedule's step)."""
        return replace(self, evidence_rate=self.evidence_rate * rate_mult)


def quantize_evidence(grad: torch.Tensor, rule: TernaryRule) -> torch.Tensor:
    """Float gradient [R, C] to int16 evidence in [-ACC_MAX, ACC_MAX] pointing downhill."""
    g = grad.to(torch.float32)
    if rule.norm == "row":
        s = g.abs().mean(dim=1, keepdim=True)
    else:
        s = g.abs().mean()
    q = torch.round(-g / (s + 1e-30) * rule.evidence_rate)
    return q.clamp(-ACC_MAX, ACC_MAX).to(torch.int16)


def _step(value: torch.Tensor, acc: torch.Tensor, threshold: int, lo: int, hi: int):
    """Move value by whole thresholds of acc, as far as [lo, hi] allows, and pay for each step.

    Doing all the steps at once (not one per update) leaves |acc| < threshold wherever value has
    room, so a later update with zero evidence changes nothing: the sparse path, which skips
    untouched rows, and the dense path, which visits every row, stay identical.
    """
    n = torch.div(acc, threshold, rounding_mode="trunc")
    n = torch.minimum(torch.maximum(n, lo - value), hi - value)
    return value + n, acc - n * threshold, int(n.abs().sum())


def _decay(acc: torch.Tensor, shift: int) -> torch.Tensor:
    if shift <= 0:
        return acc
    return acc - torch.div(acc, 1 << shift, rounding_mode="trunc")


@torch.no_grad()
def update_rows(trits: torch.Tensor, t_acc: torch.Tensor, exponent: torch.Tensor,
                e_acc: torch.Tensor, grad: torch.Tensor, rule: TernaryRule):
    """Apply the rule to a block of rows.

    trits int8 [R, C], t_acc int8 [R, C], exponent int8 [R], e_acc int8 [R], grad float [R, C]
    (dL/dW of the decoded weight). Returns new (trits, t_acc, exponent, e_acc) and a stats dict.
    Integer arithmetic after quantisation, so the result is independent of how rows are split.
    """
    q = quantize_evidence(grad, rule)
    acc = _decay(t_acc.to(torch.int16), rule.decay_shift) + q
    new_trits, acc, flips = _step(trits.to(torch.int16), acc, rule.threshold, -1, 1)
    acc = acc.clamp(-ACC_MAX, ACC_MAX)

    new_exp, new_eacc, scale_moves = exponent, e_acc, 0
    if rule.learn_scales:
        # dL/dE_r = ln2 / k * scale_r * sum_c g_rc * t_rc, evaluated with the trits the step used.
        scale = exponent_to_scale(exponent)
        g_e = (grad.to(torch.float32) * trits.to(torch.float32)).sum(1) * scale * (math.log(2) / SCALE_K)
        ev = (-torch.sign(g_e)).to(torch.int16) * rule.scale_rate
        eacc = _decay(e_acc.to(torch.int16), rule.decay_shift) + ev
        e16, eacc, scale_moves = _step(exponent.to(torch.int16), eacc, rule.scale_threshold, -128, 127)
        new_exp, new_eacc = e16.to(torch.int8), eacc.clamp(-ACC_MAX, ACC_MAX).to(torch.int8)

    stats = {"trit_flips": flips, "scale_moves": scale_moves}
    return new_trits.to(torch.int8), acc.to(torch.int8), new_exp, new_eacc, stats
