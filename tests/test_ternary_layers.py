import pytest
import torch
from torch import nn

from arbd.ternary import (TernaryEmbeddingTable, TernaryLinear, TernaryMatrix, TernaryRMSNorm,
                          TernaryRule, TernaryUpdateMixin, ternary_matrices)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_gradients_match_float64_reference():
    torch.manual_seed(0)
    layer = TernaryLinear(37, 19, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 5, 37, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 5, 19, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    _, g_w = layer.weight.evidence()

    # Independent reference: plain autograd on the decoded weight in float64.
    w = layer.weight.decode(torch.float64).clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ w.t() * gy).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert g_w.dtype == torch.float64
    assert torch.allclose(g_w, w.grad, rtol=1e-12, atol=1e-12)


def test_linear_evidence_accumulates_over_micro_batches():
    layer = TernaryLinear(8, 3)
    xs = [torch.randn(2, 8, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        layer(x).sum().backward()
    _, g = layer.weight.evidence()
    ref = sum(torch.ones(2, 3, dtype=torch.float64).t() @ x for x in xs)
    assert torch.allclose(g, ref)


def test_no_float_weight_is_a_parameter():
    model = nn.Sequential(TernaryEmbeddingTable(256, 16), TernaryRMSNorm(16), TernaryLinear(16, 4))
    assert list(model.parameters()) == []
    kinds = {k.rsplit(".", 1)[-1]: v.dtype for k, v in model.state_dict().items()}
    assert kinds == {"packed": torch.uint8, "exponent": torch.int8, "t_accum": torch.int8,
                     "e_accum": torch.int8}


def test_rmsnorm_gain_gradient_matches_reference():
    norm = TernaryRMSNorm(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    gy = torch.randn(3, 6, dtype=torch.float64)
    (norm(x) * gy).sum().backward()
    _, g = norm.gain.evidence()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    assert torch.allclose(g.reshape(-1), (normed * gy).sum(0))


def _embedding_pair(sparse_rows=50, dim=11):
    dense = TernaryEmbeddingTable(sparse_rows, dim, sparse=False, generator=torch.Generator().manual_seed(3))
    sparse = TernaryEmbeddingTable(sparse_rows, dim, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def test_sparse_embedding_matches_dense_forward_backward_and_update():
    dense, sparse = _embedding_pair()
    rule = TernaryRule(threshold=2, evidence_rate=3.0)
    for step in range(3):
        ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(step))
        # Integer-valued upstream gradients: sums are exact in any order, so the two paths'
        # evidence (and hence the integer state after the update) must agree bit for bit.
        gy = torch.randint(-3, 4, (4, 9, 11), generator=torch.Generator().manual_seed(10 + step)).double()
        out_d, out_s = dense(ids, torch.float64), sparse(ids, torch.float64)
        assert torch.equal(out_d, out_s)
        (out_d * gy).sum().backward()
        (out_s * gy).sum().backward()
        idx, g_s = sparse.weight.evidence()
        _, g_d = dense.weight.evidence()
        assert torch.equal(idx, torch.unique(ids))
        assert torch.equal(g_d[idx], g_s)
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[idx] = False
        assert torch.count_nonzero(g_d[untouched]) == 0
        dense.weight.apply_update(rule)
        sparse.weight.apply_update(rule)
        assert _same_state(dense.state_dict(), sparse.state_dict())


def test_sparse_update_touches_only_requested_rows():
    _, sparse = _embedding_pair(1000, 8)
    before = _snapshot(sparse)
    ids = torch.tensor([3, 3, 500, 999])
    (sparse(ids) * torch.randn(4, 8)).sum().backward()
    stats = sparse.weight.apply_update(TernaryRule(threshold=1, evidence_rate=5.0))
    assert stats["rows"] == 3
    after = sparse.state_dict()
    changed = set()
    for k in before:
        diff = (before[k] != after[k]).reshape(before[k].shape[0], -1).any(1)
        changed |= set(diff.nonzero().flatten().tolist())
    assert changed and changed <= {3, 500, 999}


def test_trit_moves_when_accumulator_crosses_threshold():
    layer = TernaryLinear(5, 1)
    layer.weight.set_trits(torch.tensor([[0, 0, 1, -1, 0]]), torch.tensor([0]))
    rule = TernaryRule(threshold=4, evidence_rate=2.0, learn_scales=False)
    g = torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0.0]])  # downhill: +, -, +(saturated), -(saturated), none
    layer.weight.add_grad(g)
    layer.weight.apply_update(rule)
    assert layer.weight.trits().tolist() == [[0, 0, 1, -1, 0]]
    assert layer.weight.t_accum.tolist() == [[2, -2, 2, -2, 0]]
    layer.weight.add_grad(g)
    layer.weight.apply_update(rule)
    assert layer.weight.trits().tolist() == [[1, -1, 1, -1, 0]]
    assert layer.weight.t_accum.tolist() == [[0, 0, 4, -4, 0]]


class _Tiny(TernaryUpdateMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = TernaryEmbeddingTable(32, 8, sparse=True)
        self.norm = TernaryRMSNorm(8)
        self.out = TernaryLinear(8, 32)
        self.ternary_rule = TernaryRule(threshold=1, evidence_rate=4.0)

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)))


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_is_skipped_and_leaves_state_bit_identical(bad):
    model = _Tiny()
    ids = torch.randint(0, 32, (2, 6))
    before = _snapshot(model)
    loss = _loss(model, ids) * bad
    loss.backward()
    assert any(m.has_evidence for _, m in ternary_matrices(model))
    assert model._ternary_update_memory(loss_signal=loss) is False
    assert _same_state(before, model.state_dict())
    assert model.ternary_stats.skipped_nonfinite_loss == 1
    assert not any(m.has_evidence for _, m in ternary_matrices(model)), "stale evidence survived"
    # components: one bad component skips the whole step too
    parts = {"text": _loss(model, ids), "aux": torch.tensor(bad)}
    assert model._ternary_update_memory(loss_components=parts) is False
    assert _same_state(before, model.state_dict())
    assert model.ternary_stats.skipped_nonfinite_loss == 2


def test_update_memory_runs_backward_and_changes_state():
    model = _Tiny()
    ids = torch.randint(0, 32, (2, 6))
    before = _snapshot(model)
    assert model._ternary_update_memory(loss_components={"text": _loss(model, ids)}) is True
    assert not _same_state(before, model.state_dict())
    assert model.ternary_stats.applied == 1 and model.ternary_stats.trit_flips > 0
    assert not any(m.has_evidence for _, m in ternary_matrices(model))
    loss = _loss(model, ids)
    loss.backward()
    assert model._ternary_update_memory(loss_signal=loss.item()) is True
    assert model.ternary_stats.applied == 2


def test_nonfinite_gradient_is_skipped():
    model = _Tiny()
    before = _snapshot(model)
    model.out.weight.add_grad(torch.full((32, 8), float("nan")))
    assert model._ternary_update_memory(loss_signal=1.0) is False
    assert model.ternary_stats.skipped_nonfinite_grad == 1
    assert _same_state(before, model.state_dict())


def test_bad_inputs_name_expected_and_given():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        TernaryLinear(4, 4, backend="cuda")
    layer = TernaryLinear(4, 3)
    with pytest.raises(ValueError, match="expects 4 input features, got 5"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        layer.weight.add_grad(torch.randn(4, 3))
    emb = TernaryEmbeddingTable(10, 4, sparse=True)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([10]))
    with pytest.raises(ValueError, match="loss_signal"):
        _Tiny()._ternary_update_memory()
    with pytest.raises(ValueError, match="threshold"):
        TernaryRule(threshold=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_grad_into_adds_the_product_to_the_evidence(dtype):
    from arbd.ternary import ops

    g = torch.Generator().manual_seed(11)
    gy = torch.randn(3, 5, 7, generator=g, dtype=dtype)
    x = torch.randn(3, 5, 4, generator=g, dtype=dtype)
    ref = gy.reshape(-1, 7).double().t() @ x.reshape(-1, 4).double()
    first = ops.weight_grad_into(None, gy, x)
    assert first.dtype == dtype and torch.allclose(first.double(), ref, rtol=1e-6, atol=1e-6)
    acc = first.clone()
    out = ops.weight_grad_into(acc, gy, x)
    assert out is acc and torch.allclose(acc.double(), 2 * ref, rtol=1e-6, atol=1e-6)


def test_linear_evidence_goes_through_add_grad_product():
    layer = TernaryLinear(6, 4, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(3))
    gy = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        layer(x).backward(gy)
    _, ev = layer.weight.evidence()
    ref = 2 * (gy.reshape(-1, 4).double().t() @ x.reshape(-1, 6).double())
    assert torch.allclose(ev.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gradient must have shape"):
        layer.weight.add_grad_product(gy, x[..., :5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weight_grad_into_accumulates_in_place_with_cublas_on_gpu():
    from arbd.ternary import ops

    dev = torch.device("cuda")
    assert ops._addmm_into_fp32_ok(dev), "torch.addmm(out_dtype=float32) missing or wrong here"
    g = torch.Generator(device=dev).manual_seed(5)
    for m in (1000, 4097, 300, 4096):   # ragged M runs on zero-padded rows (bucket_rows)
        gy = torch.randn(m, 96, device=dev, generator=g).to(torch.bfloat16)
        x = torch.randn(m, 80, device=dev, generator=g).to(torch.bfloat16)
        ref = gy.double().t() @ x.double()
        acc = ops.weight_grad_into(None, gy, x)
        assert acc.dtype == torch.float32
        ptr = acc.data_ptr()
        acc = ops.weight_grad_into(acc, gy, x)
        assert acc.data_ptr() == ptr   # added in place: no [N, K] temporary kept
        torch.testing.assert_close(acc.double(), 2 * ref, rtol=1e-4, atol=1e-3)


def _count_decodes(monkeypatch) -> tuple[list, object]:
    """(a list that grows by one per packing.decode call, the real packing.decode)."""
    from arbd.ternary import packing

    calls = []
    real = packing.decode
    monkeypatch.setattr(packing, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls, real


@pytest.mark.parametrize("rows, keeps", [(40, True), (19, True), (10, False)])
def test_linear_keeps_decoded_weight_for_backward_when_no_larger_than_x(rows, keeps, monkeypatch):
    # N = 19 output rows: W is kept from forward to backward when it is no larger than x (N <= M),
    # so backward decodes nothing; otherwise backward decodes W again. Either way the results are
    # the same products, bit for bit, as on a freshly decoded W.
    calls, real = _count_decodes(monkeypatch)
    layer = TernaryLinear(37, 19, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(rows, 37, generator=g, requires_grad=True)
    gy = torch.randn(rows, 19, generator=g)
    layer(x).backward(gy)
    assert len(calls) == (1 if keeps else 2)
    w = real(layer.weight.packed, layer.weight.exponent, 37, torch.float32)
    assert torch.equal(x.grad, gy @ w)
    _, ev = layer.weight.evidence()
    assert torch.equal(ev, gy.t() @ x.detach())


def test_linear_called_twice_in_one_forward_decodes_once_until_the_trits_change(monkeypatch):
    # The ACT loop calls an expert's layers several times per forward: while an earlier call's
    # decoded W is held for backward, later calls (and every backward) reuse it. After an update
    # (the buffers change in place) the next call decodes afresh, never a stale W.
    calls, real = _count_decodes(monkeypatch)
    layer = TernaryLinear(12, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    x1 = torch.randn(30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    (layer(x1).sum() + layer(x2).pow(2).sum()).backward()
    assert len(calls) == 1
    w = real(layer.weight.packed, layer.weight.exponent, 12, torch.float64)
    assert torch.equal(x1.grad, torch.ones(30, 8, dtype=torch.float64) @ w)
    assert torch.equal(x2.grad, (2 * (x2.detach() @ w.t())) @ w)

    trits = layer.weight.trits()
    trits[0] = -trits[0] + (trits[0] == 0).to(torch.int8)   # change row 0 in place
    layer.weight.set_trits(trits)
    x3 = torch.randn(30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    keep = layer(x1.detach())   # holds the new W alive
    layer(x3).sum().backward()
    assert len(calls) == 2
    w_new = real(layer.weight.packed, layer.weight.exponent, 12, torch.float64)
    assert not torch.equal(w_new, w)
    assert torch.equal(x3.grad, torch.ones(30, 8, dtype=torch.float64) @ w_new)
    del keep


def test_ternary_matrix_pickles_with_a_decoded_weight_held():
    import pickle

    layer = TernaryLinear(6, 4)
    y = layer(torch.randn(8, 6, requires_grad=True))   # a W held in the graph, cached weakly
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone.weight.packed, layer.weight.packed) and clone.weight._decoded is None
    del y


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_gpu_finiteness_check_flags_any_nonfinite_and_keeps_every_bit(bad):
    # float32 evidence on the GPU goes through torch's multi-tensor AMP check (x * 1.0 in place):
    # it must flag inf / NaN anywhere and leave finite values bit for bit, huge and subnormal included.
    from arbd.ternary.state import TernaryMatrix, all_evidence_finite

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    mats = [TernaryMatrix(r, c, device=dev) for r, c in ((64, 37), (8, 1), (300, 64))]
    for m in mats:
        m.add_grad(torch.randn(m.rows, m.cols, device=dev, generator=g))
    ev = mats[2].evidence()[1]
    ev[0, :4] = torch.tensor([3e38, -3e38, 1e-44, -1e-40], device=dev)
    mats[1].add_row_grad(torch.tensor([2, 2], device=dev), torch.ones(2, 1, device=dev))   # merged path
    if bad is not None:
        ev[5, 7] = bad
    before = [m.evidence()[1].clone() for m in mats]
    assert all_evidence_finite(mats) == (bad is None)
    for b, m in zip(before, mats):
        if bad is None:
            assert torch.equal(b.view(torch.int32), m.evidence()[1].view(torch.int32))
        else:   # a NaN's payload may change; every other value may not
            torch.testing.assert_close(m.evidence()[1], b, rtol=0, atol=0, equal_nan=True)


def test_sparse_evidence_merges_once_and_takes_later_rows():
    """evidence() merges repeated row ids once and keeps the merged rows (the update asks
    twice per step); rows added afterwards are summed in, and clearing drops everything."""
    m = TernaryMatrix(10, 4)
    m.add_row_grad(torch.tensor([3, 1, 3]), torch.ones(3, 4))
    ids, rows = m.evidence()
    again = m.evidence()
    assert again[0] is ids and again[1] is rows
    assert torch.equal(ids, torch.tensor([1, 3])) and torch.equal(rows, torch.tensor([[1.] * 4, [2.] * 4]))
    m.add_row_grad(torch.tensor([1, 7]), torch.ones(2, 4))
    ids, rows = m.evidence()
    assert torch.equal(ids, torch.tensor([1, 3, 7]))
    assert torch.equal(rows, torch.tensor([[2.] * 4, [2.] * 4, [1.] * 4]))
    m.clear_evidence()
    assert m.evidence() == (None, None)
