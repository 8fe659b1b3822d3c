"""The Triton touched-row update (triton_update.apply_votes_rows) against TernaryMatrix's torch
path, on CPU through TRITON_INTERPRET=1: after the same integer votes on the same rows, every byte
of packed trits, accumulators, exponents and scale accumulators must be identical, and so must
the flip / scale-move counts."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from arbd.ternary import triton_update as tk  # noqa: E402
from arbd.ternary.rule import TUNED_RULE, TernaryRule  # noqa: E402
from arbd.ternary.state import TernaryMatrix  # noqa: E402

if type(tk._apply_votes_kernel).__name__ != "InterpretedFunction" and not torch.cuda.is_available():
    pytest.skip("no CUDA and the Triton interpreter could not be enabled", allow_module_level=True)
DEVICE = "cpu" if type(tk._apply_votes_kernel).__name__ == "InterpretedFunction" else "cuda"

RULES = [TUNED_RULE, TernaryRule(),
         TernaryRule(threshold=5, decay_shift=3, saturated_cap=20, scale_threshold=3),
         TernaryRule(learn_scales=False, threshold=100)]


@pytest.mark.parametrize("cols", [64, 37, 1])
@pytest.mark.parametrize("rule", RULES, ids=["tuned", "default", "cap_decay", "no_scales"])
def test_apply_votes_rows_equals_torch(cols, rule):
    g = torch.Generator().manual_seed(cols)
    rows, u = 300, 77                                     # 77: no multiple of the row block
    ref = TernaryMatrix(rows, cols, generator=g)
    ref.t_accum.copy_(torch.randint(-127, 128, ref.t_accum.shape, generator=g).to(torch.int8))
    ref.e_accum.copy_(torch.randint(-127, 128, (rows,), generator=g).to(torch.int8))
    ref.exponent.copy_(torch.randint(-128, 128, (rows,), generator=g).to(torch.int8))
    got = copy.deepcopy(ref).to(DEVICE)
    idx = torch.randperm(rows, generator=g)[:u]
    votes = torch.randint(-300, 301, (u, cols), generator=g, dtype=torch.int32)
    e_votes = torch.randint(-60, 61, (u,), generator=g, dtype=torch.int32)
    ref.set_votes(idx, votes, e_votes)
    want = ref.apply_update(rule)
    stats = tk.apply_votes_rows(got.packed, got.t_accum, got.exponent, got.e_accum, idx.to(DEVICE),
                                votes.to(DEVICE), e_votes.to(DEVICE), rule, block_r=16)
    for name in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name)), name
    assert stats.tolist() == [want["trit_flips"], want["scale_moves"]]
    assert want["trit_flips"] > 0 or cols == 1


def test_apply_votes_rows_without_scale_votes_and_empty():
    g = torch.Generator().manual_seed(5)
    ref = TernaryMatrix(50, 64, generator=g)
    got = copy.deepcopy(ref).to(DEVICE)
    idx = torch.tensor([3, 9, 41])
    votes = torch.randint(-90, 91, (3, 64), generator=g, dtype=torch.int32)
    ref.set_votes(idx, votes, torch.zeros(3, dtype=torch.int32))
    ref.apply_update(TUNED_RULE)
    tk.apply_votes_rows(got.packed, got.t_accum, got.exponent, got.e_accum, idx.to(DEVICE),
                        votes.to(DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE), TUNED_RULE)
    assert torch.equal(got.packed.cpu(), ref.packed) and torch.equal(got.t_accum.cpu(), ref.t_accum)
    before = copy.deepcopy(got)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    s = tk.apply_votes_rows(got.packed, got.t_accum, got.exponent, got.e_accum, empty,
                            torch.zeros(0, 64, dtype=torch.int32, device=DEVICE), None, TUNED_RULE)
    assert s.tolist() == [0, 0] and torch.equal(got.packed, before.packed)


def test_sparse_update_through_the_kernel_equals_the_torch_rule(monkeypatch):
    """TernaryMatrix.apply_update on sparse row evidence (duplicate ids, float path) takes the
    kernel when ROW_UPDATE_KERNEL says so; the result is byte-identical to the torch rule."""
    from arbd.ternary import state

    g = torch.Generator().manual_seed(5)
    base = TernaryMatrix(300, 64, generator=g, device=DEVICE)
    idx = torch.tensor([7, 299, 7, 0, 150], device=DEVICE)
    grad = torch.randn(5, 64, generator=g).to(DEVICE)
    out = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(state, "ROW_UPDATE_KERNEL", mode)
        m = copy.deepcopy(base)
        for _ in range(3):
            m.add_row_grad(idx, grad)
            stats = m.apply_update(TUNED_RULE)
        out[mode] = (stats, [b.clone() for b in m.buffers()])
    assert out["torch"][0] == out["triton"][0] and out["torch"][0]["rows"] == 4
    assert all(torch.equal(a, b) for a, b in zip(out["torch"][1], out["triton"][1]))
    assert not torch.equal(out["torch"][1][0], base.packed) or out["torch"][0]["scale_moves"] > 0


def test_a_kernel_that_cannot_compile_falls_back_to_the_torch_rule(monkeypatch):
    """Triton 3.6 fails to compile the row kernel for 8-16 column rows on the GPU; the matrix then
    takes the torch rule (same bytes) and warns once, instead of failing the step. Other
    errors still surface."""
    import warnings

    from arbd.ternary import state

    monkeypatch.setattr(tk, "apply_votes_rows", _raiser("PassManager::run failed"))
    monkeypatch.setattr(state, "_KERNEL_FAILED", set())
    g = torch.Generator().manual_seed(9)
    base = TernaryMatrix(50, 16, generator=g, device=DEVICE)
    idx, grad = torch.tensor([3, 40], device=DEVICE), torch.randn(2, 16, generator=g).to(DEVICE)
    out = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(state, "ROW_UPDATE_KERNEL", mode)
        m = copy.deepcopy(base)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):   # the second update remembers the failure: no new warning
                m.add_row_grad(idx, grad)
                m.apply_update(TUNED_RULE)
        assert len([w for w in caught if "failed to compile" in str(w.message)]) == (mode == "triton")
        out[mode] = [b.clone() for b in m.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(out["torch"], out["triton"]))
    monkeypatch.setattr(tk, "apply_votes_rows", _raiser("CUDA error: an illegal memory access"))
    monkeypatch.setattr(state, "_KERNEL_FAILED", set())
    m = copy.deepcopy(base)
    m.add_row_grad(idx, grad)
    with pytest.raises(RuntimeError, match="illegal memory"):
        m.apply_update(TUNED_RULE)


def _raiser(message):
    def launch(*args, **kwargs):
        raise RuntimeError(message)
    return launch
