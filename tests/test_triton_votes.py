"""Committing a micro-batch's evidence as integer votes on the GPU kernels
(triton_update.votes_many through update.commit_micro_batch) against TernaryMatrix's torch path.

Votes mode quantises every micro-batch's float evidence on its own (commit_micro_batch); the
torch path does it matrix by matrix with a host read each. The kernel path must leave every
matrix with the same int32 votes and scale votes, bit for bit, over two micro-batches, for
whole matrices, touched rows, ZeRO-partitioned matrices and bf16 evidence, and fall back to the
torch path (same result, the non-finite flag set) where evidence is not finite. On CPU the
kernels run through TRITON_INTERPRET=1; the GPU-marked test runs them compiled."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from arbd.ternary import state  # noqa: E402
from arbd.ternary import triton_update as tu  # noqa: E402
from arbd.ternary.rule import TUNED_RULE, TernaryRule  # noqa: E402
from arbd.ternary.state import TernaryMatrix  # noqa: E402
from arbd.ternary.update import commit_micro_batch  # noqa: E402

INTERPRETED = type(tu._group_votes_kernel).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA and the Triton interpreter could not be enabled", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

RULES = {
    "tuned": TUNED_RULE,
    "stochastic_row": TernaryRule(rounding="stochastic", threshold=6),
    "nearest_tensor_norm": TernaryRule(norm="tensor", threshold=4, evidence_rate=7.5),
    "no_scales": replace(TUNED_RULE, learn_scales=False),
    "norm_scales": TernaryRule(rounding="stochastic", max_vote=9, scale_mode="norm"),
}
# (rows, cols, evidence): whole matrices of three widths (two share one), one with touched rows
SHAPES = [(37, 64, "dense"), (19, 41, "dense"), (23, 41, "dense"), (50, 7, "dense"), (60, 16, "rows")]


class _Mats(nn.Module):
    def __init__(self, gen: torch.Generator, partition: bool) -> None:
        super().__init__()
        self.mats = nn.ModuleList()
        for rows, cols, _ in SHAPES:
            m = TernaryMatrix(rows, cols, generator=gen)
            m.exponent.copy_(torch.randint(-128, 128, (rows,), generator=gen).to(torch.int8))
            if partition:   # a ZeRO block of the accumulators; packed trits stay whole
                m.partition_rows(rows // 3, rows // 3 + rows // 2)
            self.mats.append(m)


def _evidence(gen: torch.Generator, dtype: torch.dtype, micro_batches: int = 2) -> list:
    steps = []
    for _ in range(micro_batches):
        ev = []
        for rows, cols, kind in SHAPES:
            mags = torch.logspace(-3, 2, rows)[:, None]   # row and tensor norms differ
            g = torch.randn(rows, cols, generator=gen) * mags
            if kind == "rows":
                idx = torch.randint(0, rows, (rows // 2,), generator=gen)   # ids repeat
                ev.append((idx, g[: idx.numel()].to(dtype)))
            else:
                ev.append((None, g.to(dtype)))
        steps.append(ev)
    return steps


def _commit(base: nn.Module, steps, rule: TernaryRule, mode: str, monkeypatch) -> nn.Module:
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", mode)
    model = copy.deepcopy(base)
    for ev in steps:
        for m, (idx, g) in zip(model.mats, ev):
            if idx is None:
                m.add_grad(g.to(DEVICE))
            else:
                m.add_row_grad(idx.to(DEVICE), g.to(DEVICE))
        commit_micro_batch(model, rule, micro_batches=len(steps))
    return model


def _same_votes(a: nn.Module, b: nn.Module) -> None:
    for i, (x, y) in enumerate(zip(a.mats, b.mats)):
        assert x.marked_nonfinite == y.marked_nonfinite, i
        for u, v in zip(x.votes(), y.votes()):
            assert (u is None) == (v is None), i
            if u is not None:
                assert u.dtype == v.dtype and torch.equal(u, v), i
        assert y.evidence()[1] is None and x.evidence()[1] is None, i   # float evidence dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("partition", [False, True], ids=["whole", "zero_block"])
@pytest.mark.parametrize("name", list(RULES))
def test_votes_on_the_kernel_equal_the_torch_commit(name, partition, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(len(name) * 7 + partition)
    base = _Mats(gen, partition).to(DEVICE)
    steps = _evidence(gen, dtype)
    rule = replace(RULES[name], salt=31)
    calls = []
    real = tu.votes_many
    monkeypatch.setattr(tu, "votes_many", lambda items, r: calls.append(len(items)) or real(items, r))
    want = _commit(base, steps, rule, "torch", monkeypatch)
    assert calls == []
    got = _commit(base, steps, rule, "triton", monkeypatch)
    # per micro-batch: widths 64, 41 (two matrices), 7, and the touched rows of 16
    assert sorted(calls) == [1] * 6 + [2] * 2, calls
    _same_votes(want, got)
    assert any(int(v.abs().sum()) > 0 for m in got.mats for v in m.votes()[1:2])


def test_non_finite_evidence_falls_back_to_the_torch_commit(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    base = _Mats(gen, False).to(DEVICE)
    steps = _evidence(gen, torch.float32)
    steps[1][1][1][3, 5] = float("nan")        # the 19 x 41 matrix, second micro-batch
    steps[0][3][1][0, 0] = float("inf")        # the 50 x 7 matrix, first micro-batch
    want = _commit(base, steps, TUNED_RULE, "torch", monkeypatch)
    got = _commit(base, steps, TUNED_RULE, "triton", monkeypatch)
    assert [m.marked_nonfinite for m in got.mats] == [False, True, False, True, False]
    _same_votes(want, got)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled kernels")
def test_votes_on_the_compiled_kernel_equal_the_torch_commit_on_gpu(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    base = _Mats(gen, False).to("cuda")
    steps = _evidence(gen, torch.bfloat16, micro_batches=3)
    want = _commit(base, steps, TUNED_RULE, "torch", monkeypatch)
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "auto")
    got = _commit(base, steps, TUNED_RULE, "auto", monkeypatch)
    _same_votes(want, got)


@pytest.mark.parametrize("name", ["tuned", "norm_scales", "nearest_tensor_norm"])
def test_committed_votes_applied_by_the_row_kernel_equal_torch(name, monkeypatch):
    """The step's votes, whole matrices and touched rows, applied by the row kernel (every row of
    a whole matrix) give the torch rule's state and counts, byte for byte."""
    gen = torch.Generator().manual_seed(17 + len(name))
    base = _Mats(gen, False).to(DEVICE)
    for m in base.mats:
        m.t_accum.copy_(torch.randint(-127, 128, m.t_accum.shape, generator=gen).to(torch.int8))
    steps = _evidence(gen, torch.float32)
    rule = replace(RULES[name], salt=3)
    calls = []
    real = tu.apply_votes_rows
    monkeypatch.setattr(tu, "apply_votes_rows", lambda *a, **k: calls.append(a[4].numel()) or real(*a, **k))
    out, stats = {}, {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(state, "ROW_UPDATE_KERNEL", mode)
        model = _commit(base, steps, rule, mode, monkeypatch)
        stats[mode] = [m.apply_update(rule) for m in model.mats]
        out[mode] = model
    # the kernel ran once per matrix, over all rows of the whole ones
    assert calls[:4] == [rows for rows, _, kind in SHAPES if kind == "dense"] and len(calls) == 5, calls
    assert stats["triton"] == stats["torch"] and sum(s["trit_flips"] for s in stats["torch"]) > 0
    for a, b in zip(out["torch"].mats, out["triton"].mats):
        for k in ("packed", "t_accum", "exponent", "e_accum"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
