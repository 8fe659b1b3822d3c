"""TernaryMatrix(layout="record"): the four state buffers as views of one row record per row
(state.row_records). The reference is the same matrix in the default four-array layout: every
update path (torch rule, Triton kernels under TRITON_INTERPRET=1 on CPU, the CUDA kernels on a
GPU) must leave both layouts with identical bytes, and moving, copying, saving and loading must
keep the records (not four separate copies) and the values."""

import copy
import dataclasses
import io

import pytest
import torch

from arbd.ternary import state as st
from arbd.ternary import triton_update
from arbd.ternary.rule import TUNED_RULE, TernaryRule
from arbd.ternary.state import TernaryMatrix, record_width
from arbd.vq.codebook import TernaryVQCodebook

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = type(triton_update._apply_votes_kernel).__name__ == "InterpretedFunction"
FIELDS = ("packed", "t_accum", "exponent", "e_accum")


def _pair(rows, cols, seed=0):
    """The same random state in both layouts (accumulators and exponents randomised too)."""
    g = torch.Generator().manual_seed(seed)
    arrays = TernaryMatrix(rows, cols, generator=g)
    arrays.t_accum.copy_(torch.randint(-127, 128, (rows, cols), generator=g).to(torch.int8))
    arrays.e_accum.copy_(torch.randint(-127, 128, (rows,), generator=g).to(torch.int8))
    arrays.exponent.copy_(torch.randint(-60, 60, (rows,), generator=g).to(torch.int8))
    record = TernaryMatrix(rows, cols, layout="record")
    record.load_state_dict(arrays.state_dict())
    return arrays.to(DEVICE), record.to(DEVICE)


def _same(a, b):
    for name in FIELDS:
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name


def test_record_views_share_one_buffer():
    m = TernaryMatrix(7, 64, layout="record")
    assert m.layout == "record" and m._record.shape == (7, record_width(64)) == (7, 80)
    base = m._record.data_ptr()
    assert [getattr(m, n).data_ptr() - base for n in FIELDS] == [64, 0, 77, 78]
    assert all(getattr(m, n).stride(0) == 80 for n in FIELDS)
    assert m.state_bytes() == 7 * 80
    assert TernaryMatrix(7, 64).state_bytes() == 7 * 79
    with pytest.raises(ValueError, match="layout"):
        TernaryMatrix(3, 4, layout="rows")


def test_reset_draws_the_same_state_in_both_layouts():
    a = TernaryMatrix(50, 37, generator=torch.Generator().manual_seed(3))
    b = TernaryMatrix(50, 37, generator=torch.Generator().manual_seed(3), layout="record")
    _same(a, b)
    assert b.layout == "record"


@pytest.mark.parametrize("cols", [64, 37, 5])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("evidence", ["votes", "float_rows", "float_dense"])
def test_updates_equal_the_array_layout(cols, kernels, evidence, monkeypatch):
    if kernels == "triton" and DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("no GPU and no Triton interpreter")
    # "auto" on a GPU takes the CUDA / Triton kernels; on CPU "triton" runs the interpreter.
    choice = "torch" if kernels == "torch" else "auto" if DEVICE == "cuda" else "triton"
    monkeypatch.setattr(st, "ROW_UPDATE_KERNEL", choice)
    monkeypatch.setattr(st, "DENSE_UPDATE_KERNEL", choice)
    rows, u = 300, 77
    a, b = _pair(rows, cols, seed=cols)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(rows, generator=g)[:u].to(DEVICE)
    rule = TernaryRule(threshold=5, decay_shift=3, saturated_cap=20, scale_threshold=3)
    for step in range(3):
        if evidence == "votes":
            votes = torch.randint(-40, 41, (u, cols), generator=g, dtype=torch.int32).to(DEVICE)
            ev = torch.randint(-20, 21, (u,), generator=g, dtype=torch.int32).to(DEVICE)
            for m in (a, b):
                m.set_votes(idx, votes, ev)
        elif evidence == "float_rows":
            grad = torch.randn(u, cols, generator=g).to(DEVICE)
            for m in (a, b):
                m.add_row_grad(idx, grad)
        else:
            grad = torch.randn(rows, cols, generator=g).to(DEVICE)
            for m in (a, b):
                m.add_grad(grad)
        sa, sb = a.apply_update(rule), b.apply_update(rule)
        assert sa == sb
        _same(a, b)
        assert b.layout == "record"
    assert sa["trit_flips"] > 0


def test_fused_update_groups_by_layout():
    """apply_updates puts the two layouts in separate fused launches; dense_update_many itself
    refuses a mixed group."""
    from arbd.ternary.triton_update import DenseItem, dense_update_many
    a, b = _pair(40, 64)
    grad = torch.randn(40, 64).to(DEVICE)
    items = [DenseItem(m.packed, m.t_accum, m.exponent, m.e_accum, grad) for m in (a, b)]
    with pytest.raises(ValueError, match="one state layout"):
        dense_update_many(items, TUNED_RULE)


def test_moving_copying_and_saving_keep_the_records():
    _, m = _pair(30, 64)
    m.to("cpu")
    assert m.layout == "record"
    for clone in (copy.deepcopy(m), m.to(torch.device("cpu"))):
        assert clone.layout == "record"
        _same(clone, m)
    buf = io.BytesIO()
    torch.save(m, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert loaded.layout == "record"
    _same(loaded, m)
    # the state dict is the array layout's: either layout loads the other's
    arrays = TernaryMatrix(30, 64)
    arrays.load_state_dict(m.state_dict())
    _same(arrays, m)
    assert sorted(m.state_dict()) == sorted(arrays.state_dict()) == sorted(FIELDS)


def test_a_replaced_buffer_or_a_partition_ends_the_record_layout():
    _, m = _pair(30, 64)
    before = {n: getattr(m, n).cpu().clone() for n in FIELDS}
    m.to_arrays()
    assert m.layout == "arrays" and all(getattr(m, n).is_contiguous() for n in FIELDS)
    assert all(torch.equal(getattr(m, n).cpu(), before[n]) for n in FIELDS)
    _, m = _pair(30, 64)
    m.partition_rows(10, 20)
    assert m.layout == "arrays" and m.t_accum.shape == (10, 64)
    assert torch.equal(m.t_accum.cpu(), before["t_accum"][10:20])
    _, m = _pair(30, 64)
    m.t_accum = m.t_accum.clone()     # e.g. a tensor-parallel split assigns new buffers
    assert m.layout == "arrays"
    m.to("cpu")                       # and _apply then maps the four buffers one by one
    assert torch.equal(m.t_accum.cpu(), before["t_accum"])


def test_codebooks_store_row_records_on_request():
    cb = TernaryVQCodebook(1000, 64, exact_max=0, check_finite=False, state_layout="record")
    assert cb.matrix.layout == "record"
    assert cb.matrix.state_bytes() == 1000 * 80 and cb.state_bytes() == 1000 * 84  # + int32 usage
    plain = TernaryVQCodebook(1000, 64, exact_max=0, check_finite=False)
    assert plain.matrix.layout == "arrays" and plain.state_bytes() == 1000 * 83  # 1.3 B/trit
    plain.load_state_dict(cb.state_dict())
    _same(plain.matrix, cb.matrix)


def test_the_model_config_picks_the_codebook_layout():
    from arbd.config import get_preset
    from arbd.vq.bridge import KGVQ, SharedVQ
    cfg = get_preset("arb-tiny")
    assert SharedVQ(cfg).codebook.matrix.layout == "arrays"
    rec = dataclasses.replace(cfg, vq_state_layout="record")
    assert SharedVQ(rec).codebook.matrix.layout == "record" and KGVQ(rec).matrix.layout == "record"
    with pytest.raises(ValueError, match="vq_state_layout"):
        dataclasses.replace(cfg, vq_state_layout="rows")


def test_a_sharded_codebook_keeps_the_layout():
    from arbd.parallel.sharded_vq import ShardedTernaryVQCodebook
    sh = ShardedTernaryVQCodebook(500, 64, exact_max=0, state_layout="record")   # one rank
    ref = TernaryVQCodebook(500, 64, exact_max=0, hash_seed=0x5EED)
    assert sh.matrix.layout == "record"
    _same(sh.matrix, ref.matrix)
