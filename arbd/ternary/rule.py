"""The accumulator rule: integer evidence in, trit and scale moves out.

No float latent weight exists. Each trit has an int8 accumulator; each row's int8 log scale has
an int8 accumulator of its own. An update has two halves:

1. `quantize_evidence` (per micro-batch, or once per step): the float gradient g of the decoded
   weight becomes small integer "votes" q in accumulator units,
       q = clamp(sround(-g / s_row * rate * share), -max_vote, max_vote)
   s_row = mean |g| over the row (rows shorter than MIN_ROW_FOR_ROW_NORM use the tensor mean),
   sround = stochastic rounding driven by a hash of (x's leading bits, global row, column, step):
   unbiased, deterministic, independent of how rows are batched, sharded or ordered, no RNG state.
   `share` = 1 / (micro-batches per step), so a step's votes sum to `rate` per weight on average.
   The row's scale votes are the sign of -dL/dE per micro-batch (times scale_rate).
2. `apply_votes` (once per step, integers only): accumulators decay by 1/2**decay_shift,
   add the exact integer sum of all votes, trits move one step per whole threshold crossed
   (paying the threshold back), and accumulators that push a saturated trit further are capped
   at `saturated_cap`. Scales move the same way on their own accumulator.

Integer votes are summed exactly in any order, so dp ranks, micro-batch accumulation and row
sharding all end in the same state bit for bit. docs/decisions.md ("The ternary update rule")
gives the numbers and why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from arbd.config import SCALE_K
from arbd.hashing import M32, mix32
from arbd.ternary.packing import exponent_to_scale

ACC_MAX = 127  # accumulators are int8
VOTE_MAX = 127  # votes travel as int8 per micro-batch
MIN_ROW_FOR_ROW_NORM = 8  # shorter rows (norm gains: 1 column) normalise over the whole tensor


@dataclass(frozen=True)
class TernaryRule:
    threshold: int = 12          # accumulator units per trit step
    evidence_rate: float = 3.0   # mean |votes| per weight per step, in accumulator units
    norm: str = "row"            # evidence normalised per output row ("row") or per tensor
    decay_shift: int = 0         # >0: accumulators lose acc / 2**shift each update (forgetting)
    learn_scales: bool = True
    scale_threshold: int = 6     # scale-accumulator units per exponent step
    scale_rate: float = 1.0      # mean |scale votes| per row per step (at rate_mult 1)
    rounding: str = "nearest"    # "nearest" or "stochastic" (hash-driven, deterministic)
    max_vote: int = VOTE_MAX     # clamp of one micro-batch's votes (int8 on the wire)
    saturated_cap: int = ACC_MAX  # |acc| limit where it pushes a trit already at +-1 further
    scale_mode: str = "sign"     # scale votes: sign of -dL/dE ("sign") or -dL/dE / mean|dL/dE| ("norm")
    freeze_short_rows: bool = False  # rows shorter than MIN_ROW_FOR_ROW_NORM (norm gains) keep
                                     # their trits and learn only their scale
    salt: int = 0                # mixed into the rounding hash; the update sets it to the step
                                 # index so a stable gradient does not round the same way twice

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= ACC_MAX:
            raise ValueError(f"threshold must be in 1..{ACC_MAX}, got {self.threshold}")
        if self.norm not in ("row", "tensor"):
            raise ValueError(f"norm must be 'row' or 'tensor', got {self.norm!r}")
        if not 1 <= self.scale_threshold <= ACC_MAX:
            raise ValueError(f"scale_threshold must be in 1..{ACC_MAX}, got {self.scale_threshold}")
        if self.evidence_rate < 0 or self.decay_shift < 0 or self.scale_rate < 0:
            raise ValueError("evidence_rate, decay_shift and scale_rate must be >= 0")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if not 1 <= self.max_vote <= VOTE_MAX:
            raise ValueError(f"max_vote must be in 1..{VOTE_MAX}, got {self.max_vote}")
        if not 0 <= self.saturated_cap <= ACC_MAX:
            raise ValueError(f"saturated_cap must be in 0..{ACC_MAX}, got {self.saturated_cap}")
        if self.scale_mode not in ("sign", "norm"):
            raise ValueError(f"scale_mode must be 'sign' or 'norm', got {self.scale_mode!r}")

    def scaled(self, rate_mult: float) -> "TernaryRule":
        """The same rule with the trit and scale evidence rates multiplied (a schedule's step,
        or a micro-batch's share of the step)."""
        return replace(self, evidence_rate=self.evidence_rate * rate_mult,
                       scale_rate=self.scale_rate * rate_mult)


# The tuned rule (bench/ternary_vs_ste.py, docs/decisions.md). TernaryRule() keeps the
# foundation's defaults so that code and tests written against them keep their meaning.
TUNED_RULE = TernaryRule(threshold=24, evidence_rate=3.0, decay_shift=5, rounding="stochastic",
                         scale_mode="norm", scale_threshold=12, scale_rate=1.0, freeze_short_rows=True)

# The evidence rate is the rule's step size. TUNED_RULE's 3 was tuned on a 0.46M-weight model; at
# arb-small (152M weights) and arb-3b it flips 0.5% of all trits per step and drives the loss into
# the hundreds within 50 steps, so the larger presets take the rate measured to train them
# (bench/RESULTS.md, "The evidence rate at arb-small and arb-3b"; docs/decisions.md).
PRESET_EVIDENCE_RATES = {"arb-small": 1.0, "arb-3b": 0.75}


def preset_rule(preset: str) -> TernaryRule:
    """TUNED_RULE with the evidence rate that trains `preset` stably (a plan's `rule:` may
    override any field on top)."""
    rate = PRESET_EVIDENCE_RATES.get(preset)
    return TUNED_RULE if rate is None else replace(TUNED_RULE, evidence_rate=rate)


# -- deterministic uniforms -------------------------------------------------------------------
def _coarse_bits(g: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of g as float32 (sign, exponent, 7 mantissa bits: bfloat16 precision).

    Enough to decorrelate micro-batches and steps, and coarse on purpose: layouts that sum the
    same gradient in another order (a tensor-parallel all-reduce) differ in the last bits only,
    and those must not change the rounding (float64 runs are expected to match bit for bit)."""
    return (g.to(torch.float32).view(torch.int32).to(torch.int64) >> 16) & 0xFFFF


def hash_uniform(g: torch.Tensor, row_ids: torch.Tensor | None = None, *, col_offset: int = 0,
                 row_len: int | None = None, salt: int = 0) -> torch.Tensor:
    """Uniforms in [0, 1) (float32, 24 bits) from g's bit patterns and each entry's global
    (row, column). The same value at the same place gives the same uniform in any layout.
    A block of columns (tensor parallelism) passes its first global column and the full row
    length, so its entries hash as they would in the whole matrix."""
    r, c = g.shape
    rows = torch.arange(r, device=g.device) if row_ids is None else row_ids.to(g.device).long()
    cols = torch.arange(col_offset, col_offset + c, device=g.device)
    pos = (rows[:, None] * (c if row_len is None else row_len) + cols[None, :]) & M32
    x = mix32(_coarse_bits(g) ^ mix32(pos ^ 0x5BD1E995) ^ _salt_mix(salt))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _salt_mix(salt: int) -> int:
    return int(mix32(torch.tensor((salt * 0x9E3779B9 + 0x7F4A7C15) & M32)))


def _sround(x: torch.Tensor, row_ids: torch.Tensor | None, rule: TernaryRule,
            col_offset: int = 0, row_len: int | None = None) -> torch.Tensor:
    """Round x (evidence already normalised, in vote units) stochastically. The hash reads x's
    own leading bits: x does not change when a layout scales the raw gradient uniformly (e.g.
    DeepSpeed dividing each rank's loss by its own accumulation count), g's bits would."""
    if rule.rounding == "nearest":
        return torch.round(x)
    return torch.floor(x + hash_uniform(x, row_ids, col_offset=col_offset, row_len=row_len,
                                        salt=rule.salt))


# -- evidence ---------------------------------------------------------------------------------
# Every sum the rule takes over a row or a matrix accumulates in float64 and is then rounded to
# the evidence's dtype. A float64 sum of float32 terms hardly depends on the order of its terms,
# so the torch path, the fused GPU update (triton_update.py, which sums tiles of rows in its own
# order) and sharded layouts that add partial sums all land on the same float32 bits.
def row_sums(t: torch.Tensor) -> torch.Tensor:
    """float64 sums over dim 1, [R, 1]."""
    return t.sum(dim=1, keepdim=True, dtype=torch.float64)


def abs_mean(t: torch.Tensor) -> torch.Tensor:
    """mean |t| over all entries, summed in float64, as a 0-d tensor of t's dtype."""
    return (t.abs().sum(dtype=torch.float64) / max(t.numel(), 1)).to(t.dtype)


def _row_norm(g: torch.Tensor, rule: TernaryRule) -> torch.Tensor:
    if rule.norm == "row" and g.shape[1] >= MIN_ROW_FOR_ROW_NORM:
        return (row_sums(g.abs()) / g.shape[1]).to(g.dtype)
    return abs_mean(g)


def quantize_evidence(grad: torch.Tensor, rule: TernaryRule, *, share: float = 1.0,
                      row_ids: torch.Tensor | None = None, norm: torch.Tensor | None = None,
                      col_offset: int = 0, row_len: int | None = None) -> torch.Tensor:
    """Float gradient [R, C] to int16 votes in [-max_vote, max_vote] pointing downhill.

    `share` is this micro-batch's part of the step (1 / micro-batches per step); `row_ids` are
    the global ids of the rows (sparse path) so that stochastic rounding is layout-independent.
    When the rows are column blocks of a wider matrix (tensor parallelism), `norm` is the whole
    rows' normaliser and (col_offset, row_len) place the block for the hash.
    """
    g = grad if grad.dtype == torch.float64 else grad.to(torch.float32)
    s = _row_norm(g, rule) if norm is None else norm.to(g.dtype)
    x = -g / (s + 1e-30) * (rule.evidence_rate * share)
    q = _sround(x, row_ids, rule, col_offset, row_len)
    return q.clamp(-rule.max_vote, rule.max_vote).to(torch.int16)


def scale_grad(grad: torch.Tensor, trits: torch.Tensor, exponent: torch.Tensor, *,
               reduce_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """dL/dE per row: ln2/k * scale_r * sum_c g_rc t_rc (float64 kept for float64 runs).
    `reduce_rows` completes the row sums when the columns are split over ranks."""
    dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    scale = exponent_to_scale(exponent, dt)
    sums = row_sums(grad.to(dt) * trits.to(dt))[:, 0]
    if reduce_rows is not None:
        sums = reduce_rows(sums)   # float64 partial sums of a row split by columns
    return sums.to(dt) * scale * (math.log(2) / SCALE_K)


def votes_from_scale_grad(g_e: torch.Tensor, rule: TernaryRule, row_ids: torch.Tensor | None = None,
                          mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """int16 [R] scale votes pointing downhill from dL/dE of R rows.

    "sign": sround(scale_rate * sign(-dL/dE_r)); "norm": sround(-dL/dE_r / mean|dL/dE| * scale_rate)
    with the mean over these rows, or `mean_abs` when the rows are one block of a matrix split
    over ranks (ZeRO partitions, codebook shards): then the caller passes the whole matrix's mean."""
    if not rule.learn_scales:
        return torch.zeros(g_e.shape[0], dtype=torch.int16, device=g_e.device)
    if rule.scale_mode == "sign":
        x = -torch.sign(g_e) * rule.scale_rate
    else:
        denom = abs_mean(g_e) if mean_abs is None else mean_abs
        x = -g_e / (denom + 1e-30) * rule.scale_rate
    q = _sround(x[:, None], row_ids, rule)[:, 0]
    return q.clamp(-rule.max_vote, rule.max_vote).to(torch.int16)


def scale_votes(grad: torch.Tensor, trits: torch.Tensor, exponent: torch.Tensor,
                rule: TernaryRule, row_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scale votes of a whole matrix (the mean of "norm" taken over the rows given)."""
    if not rule.learn_scales:
        return torch.zeros(grad.shape[0], dtype=torch.int16, device=grad.device)
    return votes_from_scale_grad(scale_grad(grad, trits, exponent), rule, row_ids)


# -- the integer step -------------------------------------------------------------------------
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


def _cap_saturated(trits: torch.Tensor, acc: torch.Tensor, cap: int) -> torch.Tensor:
    if cap >= ACC_MAX:
        return acc
    push_up = (trits == 1) & (acc > cap)
    push_down = (trits == -1) & (acc < -cap)
    return torch.where(push_up, torch.full_like(acc, cap), torch.where(push_down, torch.full_like(acc, -cap), acc))


@torch.no_grad()
def apply_votes(trits: torch.Tensor, t_acc: torch.Tensor, exponent: torch.Tensor, e_acc: torch.Tensor,
                votes: torch.Tensor, e_votes: torch.Tensor | None, rule: TernaryRule):
    """The integer half of the rule on a block of rows.

    trits int8 [R, C], t_acc int8 [R, C], exponent int8 [R], e_acc int8 [R], votes int [R, C]
    (the exact sum of every micro-batch's votes), e_votes int [R] or None.
    Returns new (trits, t_acc, exponent, e_acc) and a stats dict.
    """
    acc = _decay(t_acc.to(torch.int32), rule.decay_shift) + votes.to(torch.int32)
    if rule.freeze_short_rows and trits.shape[1] < MIN_ROW_FOR_ROW_NORM:
        acc = torch.zeros_like(acc)
    new_trits, acc, flips = _step(trits.to(torch.int32), acc, rule.threshold, -1, 1)
    acc = _cap_saturated(new_trits, acc, rule.saturated_cap).clamp(-ACC_MAX, ACC_MAX)

    new_exp, new_eacc, scale_moves = exponent, e_acc, 0
    if rule.learn_scales and e_votes is not None:
        eacc = _decay(e_acc.to(torch.int32), rule.decay_shift) + e_votes.to(torch.int32)
        e32, eacc, scale_moves = _step(exponent.to(torch.int32), eacc, rule.scale_threshold, -128, 127)
        new_exp, new_eacc = e32.to(torch.int8), eacc.clamp(-ACC_MAX, ACC_MAX).to(torch.int8)

    stats = {"trit_flips": flips, "scale_moves": scale_moves}
    return new_trits.to(torch.int8), acc.to(torch.int8), new_exp, new_eacc, stats


@torch.no_grad()
def update_rows(trits: torch.Tensor, t_acc: torch.Tensor, exponent: torch.Tensor,
                e_acc: torch.Tensor, grad: torch.Tensor, rule: TernaryRule,
                row_ids: torch.Tensor | None = None):
    """Quantise one step's float gradient (as a single micro-batch) and apply it.

    trits int8 [R, C], t_acc int8 [R, C], exponent int8 [R], e_acc int8 [R], grad float [R, C]
    (dL/dW of the decoded weight). Returns new (trits, t_acc, exponent, e_acc) and a stats dict.
    """
    q = quantize_evidence(grad, rule, row_ids=row_ids)
    ev = scale_votes(grad, trits, exponent, rule, row_ids)
    return apply_votes(trits, t_acc, exponent, e_acc, q, ev, rule)
