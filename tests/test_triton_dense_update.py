"""The fused dense update (triton_update.dense_update) against TernaryMatrix's torch path.

On CPU the kernels run through TRITON_INTERPRET=1; on a CUDA machine the GPU-marked test runs
them for real. After the same fp32 evidence, every byte of packed trits, accumulators, exponents
and scale accumulators must be identical, and so must the flip / scale-move counts, over three
successive updates (so later steps start from states the kernel wrote)."""

import copy
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from arbd.ternary import state  # noqa: E402
from arbd.ternary import triton_update as tu  # noqa: E402
from arbd.ternary.rule import TUNED_RULE, TernaryRule  # noqa: E402
from arbd.ternary.state import TernaryMatrix  # noqa: E402

INTERPRETED = type(tu._group_update_kernel).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA and the Triton interpreter could not be enabled", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

RULES = {
    "tuned": TUNED_RULE,
    "default": TernaryRule(),
    "stochastic_row": TernaryRule(rounding="stochastic", threshold=6),
    "nearest_tensor_norm": TernaryRule(norm="tensor", threshold=4, evidence_rate=7.5),
    "no_scales": replace(TUNED_RULE, learn_scales=False),
    "cap_decay": TernaryRule(threshold=5, decay_shift=3, saturated_cap=20, scale_threshold=3,
                             rounding="stochastic", max_vote=9, scale_mode="norm"),
}
SHAPES = [(37, 64), (19, 41), (50, 7), (33, 1), (5, 203)]


def _nonzero_grad(shape, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    g = torch.randn(*shape, generator=gen) * scale
    return torch.where(g == 0, torch.full_like(g, 1e-3), g)


def _run(base: TernaryMatrix, grads, rule: TernaryRule, mode: str, monkeypatch):
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", mode)
    m = copy.deepcopy(base)
    out = []
    for step, g in enumerate(grads):
        m.add_grad(g.to(m.packed.device))
        out.append(m.apply_update(replace(rule, salt=rule.salt + 1000 * step)))
    return out, m


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("name", list(RULES))
def test_dense_kernel_equals_torch(shape, name, monkeypatch):
    rule = RULES[name]
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * 1000 + cols + len(name))
    base = TernaryMatrix(rows, cols, generator=gen)
    base.t_accum.copy_(torch.randint(-127, 128, base.t_accum.shape, generator=gen).to(torch.int8))
    base.e_accum.copy_(torch.randint(-127, 128, (rows,), generator=gen).to(torch.int8))
    base.exponent.copy_(torch.randint(-128, 128, (rows,), generator=gen).to(torch.int8))
    # rows of very different magnitudes, so row and tensor norms differ
    mags = torch.logspace(-3, 2, rows)[:, None]
    grads = [_nonzero_grad(shape, gen) * mags for _ in range(3)]
    base = base.to(DEVICE)
    want, ref = _run(base, grads, replace(rule, salt=17), "torch", monkeypatch)
    got, out = _run(base, grads, replace(rule, salt=17), "triton", monkeypatch)
    for name_ in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(out, name_), getattr(ref, name_)), name_
    assert got == want
    assert sum(s["trit_flips"] for s in want) > 0 or rule.freeze_short_rows and cols < 8


def test_dense_kernel_transposed_evidence_and_zeros(monkeypatch):
    """Evidence in a transposed layout (read through strides) with exact zeros in it."""
    gen = torch.Generator().manual_seed(3)
    base = TernaryMatrix(24, 45, generator=gen).to(DEVICE)
    g = torch.randn(45, 24, generator=gen).t()
    g[3, :10] = 0.0
    g[5] = -0.0
    assert not g.is_contiguous()
    out = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", mode)
        m = copy.deepcopy(base)
        m._grad = g.to(DEVICE)      # add_grad's clone keeps the layout; set it as is
        stats = m.apply_update(TUNED_RULE)
        out[mode] = (stats, [b.clone() for b in m.buffers()])
    assert out["torch"][0] == out["triton"][0]
    assert all(torch.equal(a, b) for a, b in zip(out["torch"][1], out["triton"][1]))


def test_dense_kernel_falls_back_for_float64(monkeypatch):
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "triton")
    called = []
    monkeypatch.setattr(tu, "dense_update_many", lambda *a, **k: called.append(1))
    m = TernaryMatrix(8, 16, generator=torch.Generator().manual_seed(0))
    m.add_grad(torch.randn(8, 16, dtype=torch.float64))
    m.apply_update(TUNED_RULE)
    assert not called


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled kernels")
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (2048, 7)])
def test_dense_kernel_on_gpu_equals_torch_on_gpu(shape, monkeypatch):
    """Compiled kernels against the torch rule on the same GPU, at model-like shapes."""
    gen = torch.Generator().manual_seed(shape[0])
    base = TernaryMatrix(*shape, generator=gen, device="cuda")
    grads = [_nonzero_grad(shape, gen, 1e-4) for _ in range(3)]
    want, ref = _run(base, grads, TUNED_RULE, "torch", monkeypatch)
    got, out = _run(base, grads, TUNED_RULE, "triton", monkeypatch)
    for name_ in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(out, name_), getattr(ref, name_)), name_
    assert got == want


@pytest.mark.parametrize("rule", [TernaryRule(evidence_rate=5.0, threshold=3), TernaryRule(
    evidence_rate=5.0, threshold=3, rounding="stochastic")], ids=["nearest", "stochastic"])
def test_dense_kernel_half_way_votes(rule, monkeypatch):
    """Evidence landing exactly on k + 1/2 votes: "nearest" must round half to even."""
    gen = torch.Generator().manual_seed(9)
    base = TernaryMatrix(16, 40, generator=gen).to(DEVICE)
    signs = torch.where(torch.rand(16, 40, generator=gen) < 0.5, -1.0, 1.0)
    mags = torch.where(torch.arange(40) % 2 == 0, 1.0, 3.0)      # row means 2: x = +-2.5, +-7.5
    grads = [signs * mags, signs * mags * 4.0, -signs * mags]
    want, ref = _run(base, grads, rule, "torch", monkeypatch)
    got, out = _run(base, grads, rule, "triton", monkeypatch)
    for name_ in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(out, name_), getattr(ref, name_)), name_
    assert got == want


GROUPED = [(37, 64), (19, 64), (5, 64), (19, 41), (33, 1), (2, 1), (50, 7), (13, 7)]


def _updated_apart_and_together(shapes, rule, monkeypatch, device=DEVICE, scale=1.0, seed=7):
    """The same matrices and evidence, updated one by one with the torch rule and together by
    update.apply_updates with the fused kernels: (per-matrix totals, apply_updates' result,
    reference matrices, kernel-updated matrices)."""
    from arbd.ternary.update import apply_updates

    gen = torch.Generator().manual_seed(seed)
    mats = [TernaryMatrix(r, c, generator=gen, device=device) for r, c in shapes]
    for m in mats:   # start from busy accumulators so that moves happen at once
        m.t_accum.copy_(torch.randint(-100, 101, m.t_accum.shape, generator=gen).to(torch.int8))
        m.e_accum.copy_(torch.randint(-100, 101, (m.rows,), generator=gen).to(torch.int8))
    grads = [_nonzero_grad((m.rows, m.cols), gen, scale) * torch.logspace(-2, 1, m.rows)[:, None]
             for m in mats]
    ref = copy.deepcopy(mats)
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "torch")
    flips = moves = 0
    for m, g in zip(ref, grads):
        m.add_grad(g.to(device))
        s = m.apply_update(rule)
        flips, moves = flips + s["trit_flips"], moves + s["scale_moves"]
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "triton")
    for m, g in zip(mats, grads):
        m.add_grad(g.to(device))
    got = apply_updates([(str(i), m) for i, m in enumerate(mats)], rule)
    return {"trit_flips": flips, "scale_moves": moves}, got, ref, mats


@pytest.mark.parametrize("name", ["tuned", "nearest_tensor_norm", "cap_decay", "no_scales"])
def test_apply_updates_groups_matrices_and_matches_per_matrix_updates(name, monkeypatch):
    # Matrices of one column count share launches (three at most per count), their rows
    # numbered across the group; counts stay on the device until the end. Totals and every
    # state byte must equal matrix-by-matrix updates with the torch rule.
    calls = []
    real = tu.dense_update_many
    monkeypatch.setattr(tu, "dense_update_many", lambda items, rule: calls.append(
        len(items)) or real(items, rule))
    want, got, ref, mats = _updated_apart_and_together(GROUPED, replace(RULES[name], salt=5),
                                                       monkeypatch)
    assert sorted(calls) == [1, 2, 2, 3]     # cols 41; 1 and 7 (two matrices each); 64
    assert want["trit_flips"] > 0 and got == want
    assert all(isinstance(v, int) for v in got.values())
    for a, b in zip(ref, mats):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert not b.has_evidence


@pytest.mark.parametrize("shape", [(37, 64), (50, 7), (300, 16), (19, 41)], ids=str)
@pytest.mark.parametrize("name", list(RULES))
def test_touched_rows_through_the_fused_kernel_equal_torch(shape, name, monkeypatch):
    """Sparse row evidence only (ids repeat, so rows are merged first): the fused kernel updates
    exactly the touched rows as the torch path does (global row ids hash the rounding, the
    "norm" scale mean is over the touched rows), every other row untouched; three steps."""
    rule = replace(RULES[name], salt=23)
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows + 7 * cols + len(name))
    base = TernaryMatrix(rows, cols, generator=gen)
    base.t_accum.copy_(torch.randint(-127, 128, base.t_accum.shape, generator=gen).to(torch.int8))
    base.exponent.copy_(torch.randint(-128, 128, (rows,), generator=gen).to(torch.int8))
    base = base.to(DEVICE)
    steps = []
    for _ in range(3):
        idx = torch.randint(0, rows, (max(2, rows // 3),), generator=gen)
        steps.append((idx, _nonzero_grad((idx.numel(), cols), gen) * 3))
    out, counts, calls = {}, {}, []
    real = tu.dense_update_many
    monkeypatch.setattr(tu, "dense_update_many", lambda items, r: calls.append(
        items[0].row_ids is not None) or real(items, r))
    for mode in ("torch", "triton"):
        monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", mode)
        m = copy.deepcopy(base)
        counts[mode] = []
        for step, (idx, g) in enumerate(steps):
            m.add_row_grad(idx.to(DEVICE), g.to(DEVICE))
            s = m.apply_update(replace(rule, salt=rule.salt + step))
            counts[mode].append((s["trit_flips"], s["scale_moves"]))
        out[mode] = m
    assert calls == [True] * 3   # the triton runs took the fused kernel, with row ids
    for name_ in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(out["triton"], name_), getattr(out["torch"], name_)), name_
    assert counts["triton"] == counts["torch"]
    touched = torch.unique(torch.cat([i for i, _ in steps]))
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(out["triton"].t_accum[untouched.to(DEVICE)], base.t_accum[untouched.to(DEVICE)])


def test_apply_updates_keeps_matrices_the_kernel_cannot_take_apart(monkeypatch):
    # Sparse row evidence (now a fused group of its own) beside a fused dense group.
    from arbd.ternary.update import apply_updates

    gen = torch.Generator().manual_seed(11)
    mats = [TernaryMatrix(12, 20, generator=gen, device=DEVICE) for _ in range(3)]
    ref = copy.deepcopy(mats)
    idx = torch.tensor([1, 4, 4, 9])
    rows = _nonzero_grad((4, 20), gen)
    dense = [_nonzero_grad((12, 20), gen) for _ in range(2)]
    totals = {}
    for mode, ms in (("torch", ref), ("triton", mats)):
        monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", mode)
        ms[0].add_row_grad(idx.to(DEVICE), rows.to(DEVICE))
        for m, g in zip(ms[1:], dense):
            m.add_grad(g.to(DEVICE))
        totals[mode] = apply_updates([(str(i), m) for i, m in enumerate(ms)],
                                     replace(TUNED_RULE, threshold=2, scale_threshold=2))
    assert totals["torch"] == totals["triton"] and totals["torch"]["trit_flips"] > 0
    for a, b in zip(ref, mats):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled kernels")
def test_grouped_update_on_gpu_equals_torch_on_gpu(monkeypatch):
    shapes = [(1024, 4096), (3000, 4096), (4096, 1024), (512, 1024), (2048, 1), (4096, 1)]
    want, got, ref, mats = _updated_apart_and_together(shapes, TUNED_RULE, monkeypatch,
                                                       device="cuda", scale=1e-4)
    assert want["trit_flips"] > 0 and got == want
    for a, b in zip(ref, mats):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _blocks_against_whole(shape, rule, device, blocks=3, scale=1.0, seed=11):
    """One matrix updated whole by the torch rule, and the same matrix updated block by block
    (a ZeRO partition) by dense_update_many with each block's global row offset and the mean
    |dL/dE| over all rows: the two must agree byte for byte over three steps."""
    from arbd.ternary.rule import abs_mean
    from arbd.ternary.zero import row_blocks
    rows, cols = shape
    gen = torch.Generator().manual_seed(seed)
    whole = TernaryMatrix(rows, cols, generator=gen).to(device)
    whole.t_accum.copy_(torch.randint(-100, 100, whole.t_accum.shape, generator=gen).to(torch.int8))
    parts = copy.deepcopy(whole)
    counts_whole = counts_parts = 0
    for step in range(3):
        r = replace(rule, salt=rule.salt + 1000 * step)
        g = _nonzero_grad(shape, gen, scale).to(device)
        whole.add_grad(g)
        s = whole.apply_update(r)
        counts_whole += s["trit_flips"] + s["scale_moves"]
        mean = abs_mean(parts.scale_grad(g)) if rule.scale_mode == "norm" else None
        items = [tu.DenseItem(parts.packed[a:b], parts.t_accum[a:b], parts.exponent[a:b],
                              parts.e_accum[a:b], g[a:b].contiguous(), row_offset=a,
                              mean_ge=None if mean is None else mean.reshape(1))
                 for a, b in row_blocks(rows, blocks) if b > a]
        counts_parts += int(sum(tu.dense_update_many([it], r).sum() for it in items))
    return whole, parts, counts_whole, counts_parts


@pytest.mark.parametrize("name", ["tuned", "stochastic_row", "default"])
def test_row_blocks_with_offsets_and_a_given_mean_equal_the_whole_matrix(name, monkeypatch):
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "torch")
    whole, parts, cw, cp = _blocks_against_whole((23, 40), RULES[name], DEVICE)
    assert cw > 0 and cp == cw
    for f in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(parts, f), getattr(whole, f)), f


def test_row_block_arguments_are_checked():
    m = TernaryMatrix(4, 10).to(DEVICE)
    g = torch.ones(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="mean_ge must be one float32"):
        tu.dense_update_many([tu.DenseItem(m.packed[:2], m.t_accum[:2], m.exponent[:2], m.e_accum[:2],
                                           g, row_offset=2, mean_ge=torch.ones(2, device=DEVICE))],
                             TUNED_RULE)
    with pytest.raises(ValueError, match="tensor-wide norm"):
        tu.dense_update_many([tu.DenseItem(m.packed[:2], m.t_accum[:2], m.exponent[:2], m.e_accum[:2],
                                           g, row_offset=2, mean_ge=torch.ones(1, device=DEVICE))],
                             RULES["nearest_tensor_norm"])
    sums = dict(row_abs_sums=torch.ones(2, dtype=torch.float64, device=DEVICE),
                ge=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="row sums .* for every matrix or for none"):
        tu.dense_update_many([tu.DenseItem(m.packed[:2], m.t_accum[:2], m.exponent[:2],
                                           m.e_accum[:2], g, col_offset=10, row_len=20, **sums),
                              tu.DenseItem(m.packed[2:], m.t_accum[2:], m.exponent[2:],
                                           m.e_accum[2:], g)], TUNED_RULE)
    with pytest.raises(ValueError, match="do not fit"):
        tu.dense_update_many([tu.DenseItem(m.packed[:2], m.t_accum[:2], m.exponent[:2],
                                           m.e_accum[:2], g, col_offset=15, row_len=20, **sums)],
                             TUNED_RULE)
    with pytest.raises(ValueError, match="ge must be"):
        tu.dense_update_many([tu.DenseItem(m.packed[:2], m.t_accum[:2], m.exponent[:2],
                                           m.e_accum[:2], g, col_offset=10, row_len=20,
                                           row_abs_sums=sums["row_abs_sums"],
                                           ge=torch.ones(3, device=DEVICE))], TUNED_RULE)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs compiled kernels")
def test_row_blocks_on_gpu_equal_the_whole_matrix_on_gpu(monkeypatch):
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "torch")
    whole, parts, cw, cp = _blocks_against_whole((3000, 1024), TUNED_RULE, "cuda", blocks=2,
                                                 scale=1e-4)
    assert cw > 0 and cp == cw
    for f in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(parts, f), getattr(whole, f)), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_scale_grads_equal_the_rule_for_blocks_of_several_widths(dtype):
    """triton_update.row_scale_grads (one launch per column count) against TernaryMatrix.scale_grad
    (the torch rule), for whole matrices and row blocks of three widths, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    items, want = [], []
    for rows, cols, (a, b) in [(23, 40, (0, 23)), (30, 40, (11, 30)), (9, 7, (2, 2)), (17, 203, (3, 9))]:
        m = TernaryMatrix(rows, cols, generator=gen).to(DEVICE)
        m.exponent.copy_(torch.randint(-40, 40, (rows,), generator=gen).to(torch.int8))
        g = _nonzero_grad((b - a, cols), gen).to(dtype).to(DEVICE)
        items.append(tu.DenseItem(m.packed[a:b], m.t_accum[a:b], m.exponent[a:b], m.e_accum[a:b],
                                  g, row_offset=a))
        want.append(m.scale_grad(g, torch.arange(a, b, device=DEVICE)))
    got = tu.row_scale_grads(items)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert sum(int((t != 0).sum()) for t in want) > 0
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and torch.equal(x, y.to(torch.float32))
