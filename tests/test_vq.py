import hashlib
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from arbd.config import get_preset, logical_ternary_weights
from arbd.ternary import TernaryRule, apply_ternary_update, packing, ternary_matrices
from arbd.ternary.update import UpdateStats
from arbd.vq import KGVQ, CellLayout, SharedVQ, SignHash, TernaryVQCodebook, lookup

BIG = 1_000_001  # the seeds' own check: a codebook just above 1M rows


@pytest.fixture(scope="module")
def big():
    return TernaryVQCodebook(BIG, 64, candidate_count=64, exact_max=65_536)


def _queries(n, dim=64, seed=0, scale=1.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


def _ref_argmin(x, w, ids=None):
    """float64 brute force: squared L2 over rows w [R, d] (optionally per-query rows [N, C, d]),
    lowest id among exact ties."""
    x = x.double()
    d = ((x[:, None, :] - w.double()) ** 2).sum(-1) if w.dim() == 3 else torch.cdist(x, w.double()) ** 2
    if ids is None:
        ids = torch.arange(d.shape[1]).expand_as(d)
    best = d.min(1, keepdim=True).values
    return torch.where(d == best, ids, torch.iinfo(torch.int64).max).min(1).values, d


# -- exact path ----------------------------------------------------------------------------------

def test_exact_lookup_matches_float64_brute_force():
    cb = TernaryVQCodebook(3000, 64, exact_max=10_000)
    x = torch.cat([_queries(150, seed=1), _queries(50, seed=2, scale=1e-3),
                   _queries(50, seed=3, scale=50.0)])
    ids = cb.lookup(x)
    w = cb.decode_rows(torch.arange(3000), torch.float64)
    ref, d = _ref_argmin(x, w)
    # Queries are rounded to 17 bits before scoring; that may only matter for near-ties.
    chosen = d.gather(1, ids[:, None]).squeeze(1)
    assert torch.all(chosen - d.min(1).values <= 1e-9 * x.double().pow(2).sum(1))
    assert (ids == ref).float().mean() >= 0.99


def test_chunked_exact_equals_unchunked():
    cb = TernaryVQCodebook(5000, 64, exact_max=10_000)
    x = _queries(120, seed=4)
    whole = cb.lookup(x)
    cb.max_chunk_bytes = 64 << 10  # 32 queries x 256 rows per chunk: both dimensions chunked
    assert torch.equal(cb.lookup(x), whole)
    cb.max_chunk_bytes = 300_000   # all queries x 312 rows (a ragged last chunk)
    assert torch.equal(cb.lookup(x), whole)


def test_exact_ids_do_not_depend_on_float32_matmul_precision():
    cb = TernaryVQCodebook(4000, 64, exact_max=10_000)
    x = _queries(200, seed=5)
    ref = cb.lookup(x)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # may use bf16: the float64 fallback takes over
        assert torch.equal(cb.lookup(x), ref)
    finally:
        torch.set_float32_matmul_precision(old)


# -- candidate path ------------------------------------------------------------------------------

def test_candidate_lookup_is_exact_best_among_its_candidates():
    cb = TernaryVQCodebook(50_000, 64, candidate_count=48, exact_max=0)
    near = cb.decode_rows(torch.arange(0, 50_000, 500)) + 0.1 * _queries(100, seed=7)
    x = torch.cat([_queries(200, seed=6), near])
    cand, valid = cb.candidate_ids(x)
    assert valid.all()  # 48 slots are always filled: cells hold >= 1 row and enough probes are taken
    assert all(len(set(r.tolist())) == 48 for r in cand)  # distinct rows
    ids = cb.lookup(x)
    ref, _ = _ref_argmin(x, cb.decode_rows(cand, torch.float64), ids=cand)
    assert torch.equal(ids, ref)


def test_candidate_path_equals_exact_when_candidates_cover_the_codebook():
    cb = TernaryVQCodebook(40, 64, candidate_count=40, exact_max=0)  # 32 cells of 1-2 rows
    x = _queries(300, seed=8)
    cand, valid = cb.candidate_ids(x)
    assert bool(valid.all())
    assert torch.equal(cand.sort(1).values, torch.arange(40).expand(300, 40))
    assert torch.equal(cb.lookup(x, mode="candidates"), cb.lookup(x, mode="exact"))


def test_candidate_ids_are_deterministic_and_batch_independent():
    cb = TernaryVQCodebook(20_000, 64, candidate_count=32, exact_max=0)
    x = _queries(64, seed=9)
    a, _ = cb.candidate_ids(x)
    torch.manual_seed(1234)  # the global RNG plays no part
    b, _ = cb.candidate_ids(x)
    c, _ = cb.candidate_ids(x[:7])
    assert torch.equal(a, b) and torch.equal(a[:7], c)
    ids = cb.lookup(x)
    assert torch.equal(cb.lookup(x[5:9]), ids[5:9])


_CHILD = """
import hashlib, torch
from arbd.vq import TernaryVQCodebook
torch.manual_seed({seed})
cb = TernaryVQCodebook(20_000, 64, candidate_count=32, exact_max=0)
x = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
ids, _ = cb.candidate_ids(x)
h = hashlib.sha256(ids.numpy().tobytes() + cb.matrix.packed.numpy().tobytes()
                   + cb.lookup(x).numpy().tobytes()).hexdigest()
print(h)
"""


def test_candidate_ids_and_init_are_the_same_in_another_process():
    outs = [subprocess.run([sys.executable, "-c", _CHILD.format(seed=s)], capture_output=True,
                           text=True, check=True).stdout.strip() for s in (1, 2)]
    cb = TernaryVQCodebook(20_000, 64, candidate_count=32, exact_max=0)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
    ids, _ = cb.candidate_ids(x)
    here = hashlib.sha256(ids.numpy().tobytes() + cb.matrix.packed.numpy().tobytes()
                          + cb.lookup(x).numpy().tobytes()).hexdigest()
    assert outs == [here, here]


def test_near_duplicate_recall(big):
    # Measured (bench/RESULTS.md): ~0.99 at noise/signal 0.35 with 64 candidates on fresh rows.
    g = torch.Generator().manual_seed(10)
    src = torch.randint(0, BIG, (400,), generator=g)
    rows = big.decode_rows(src)
    x = rows + 0.35 * rows.norm(dim=1, keepdim=True) / 8 * torch.randn(400, 64, generator=g)
    ids = big.lookup(x)
    assert (ids == src).float().mean() >= 0.95


def test_every_row_hashes_to_its_own_cell():
    cb = TernaryVQCodebook(10_007, 64, exact_max=0)
    rows = torch.arange(10_007)
    xq, _ = lookup.quantize_queries(cb.decode_rows(rows))
    assert torch.equal(cb.hasher.cells(cb.hasher.projections(xq)), cb.layout.cell_of(rows))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), bits=st.integers(0, 12))
def test_cell_layout_partitions_rows(n, bits):
    if (1 << bits) > n:
        bits = int(math.log2(n))
    lay = CellLayout(n, bits)
    rows = torch.arange(n)
    cell = lay.cell_of(rows)
    assert torch.all((lay.cell_start(cell) <= rows) & (rows < lay.cell_start(cell + 1)))
    cells = torch.arange(lay.num_cells)
    sizes = lay.cell_start(cells + 1) - lay.cell_start(cells)
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= lay.max_cell_rows


def test_probe_order_starts_at_own_cell_and_flips_least_confident_bits():
    h = SignHash(64, 6, seed=3)
    p = torch.tensor([[5, -1, 7, -30, 2, 9]])
    cells = h.probe_cells(p, 4)[0].tolist()
    own = 0b110101  # bits j with p_j > 0: 0, 2, 4, 5
    assert cells[0] == own
    # Cheapest flips: bit1 (|p|=1), bit4 (2), bits1+4 (3), then bit0 (5).
    assert cells[1:] == [own ^ 0b10, own ^ 0b10000, own ^ 0b10010]


# -- scoring arithmetic --------------------------------------------------------------------------

def test_scores_are_batch_invariant_and_shared_by_both_paths():
    cb = TernaryVQCodebook(3000, 64, candidate_count=64, exact_max=0)
    x = _queries(100, seed=11)
    xq, u = lookup.quantize_queries(x)
    ids, valid = lookup.candidate_ids(xq, cb.hasher, cb.layout, 64)
    rows, ex = lookup.fetch_rows(cb.matrix.packed, cb.matrix.exponent, ids)
    full = lookup.candidate_scores(xq, u, rows, ex, valid)
    one = lookup.candidate_scores(xq[3:4], u[3:4], rows[3:4], ex[3:4], valid[3:4])
    assert torch.equal(full[3:4], one)
    trits, nnz = lookup.decode_rows(cb.matrix.packed, 64)
    block = lookup.block_scores(xq, u, trits, nnz, cb.matrix.exponent)
    assert torch.equal(torch.where(valid, block.gather(1, ids), math.inf), full)


def test_lookup_decode_tables_match_packing():
    g = torch.Generator().manual_seed(12)
    t = torch.randint(-1, 2, (300, 64), generator=g).to(torch.int8)
    packed = packing.pack_trits(t)
    assert torch.equal(packing.unpack_trits(packed, 64), t)
    trits, nnz = lookup.decode_rows(packed, 64)
    assert torch.equal(trits, t.float()) and torch.equal(nnz, (t != 0).sum(1, dtype=torch.int32))


# -- training --------------------------------------------------------------------------------------

def test_straight_through_gradient_is_identity():
    cb = TernaryVQCodebook(500, 64, exact_max=1000)
    x = _queries(20, seed=13).reshape(4, 5, 64).requires_grad_(True)
    out = cb(x)
    assert torch.equal(out.quantized.detach(), cb.decode_rows(out.ids.reshape(-1)).reshape(4, 5, 64))
    gy = torch.randn(4, 5, 64)
    (out.quantized * gy).sum().backward()
    assert torch.equal(x.grad, gy)


def test_losses_and_row_evidence_match_reference():
    cb = TernaryVQCodebook(300, 64, exact_max=1000, beta=0.25)
    x = _queries(40, seed=14).double()
    x[20:] = x[:20]  # repeated queries: the chosen rows receive summed evidence
    xr = x.clone().requires_grad_(True)
    out = cb(xr)
    q = cb.decode_rows(out.ids, torch.float64)
    ref = ((x - q) ** 2).mean()
    assert torch.allclose(out.codebook_loss, ref, rtol=1e-12)
    assert torch.allclose(out.commitment, ref, rtol=1e-12)
    assert torch.allclose(out.loss, 1.25 * ref, rtol=1e-12)
    out.loss.backward()
    assert torch.allclose(xr.grad, 0.25 * 2 * (x - q) / x.numel(), rtol=1e-12)
    idx, g = cb.matrix.evidence()
    assert torch.equal(idx, torch.unique(out.ids))
    want = torch.zeros(300, 64, dtype=torch.float64).index_add_(0, out.ids, 2 * (q - x) / x.numel())
    assert torch.allclose(g, want[idx], rtol=1e-12)


def test_training_reduces_codebook_loss():
    cb = TernaryVQCodebook(2000, 64, exact_max=0, candidate_count=32)
    x = _queries(256, seed=15)
    rule = TernaryRule()
    first = float(cb(x).codebook_loss.detach())
    cb.matrix.clear_evidence()
    for _ in range(30):
        cb(x).codebook_loss.backward()
        cb.apply_update(rule)
    assert float(cb(x).codebook_loss.detach()) < 0.8 * first


def _changed_rows(before, cb):
    ch = torch.zeros(cb.num_codes, dtype=torch.bool)
    for name, buf in cb.state_dict().items():
        diff = buf != before[name]
        ch |= diff.reshape(cb.num_codes, -1).any(1)
    return ch


def test_update_changes_only_touched_rows(big):
    before = {k: v.clone() for k, v in big.state_dict().items()}
    x = _queries(512, seed=16)
    big.train()
    out = big(x)
    out.loss.backward()
    stats = big.apply_update(TernaryRule(threshold=1, evidence_rate=3.0))  # large moves: rows do change
    touched = torch.zeros(BIG, dtype=torch.bool)
    touched[out.ids] = True
    changed = _changed_rows(before, big)
    assert stats["rows"] == int(touched.sum())
    assert changed.any() and not bool((changed & ~touched).any())  # every other byte identical
    big.load_state_dict(before)


def test_usage_counts_touched_rows_only():
    cb = TernaryVQCodebook(5000, 64, candidate_count=16, exact_max=0)
    xs = [_queries(300, seed=17), _queries(300, seed=17)[:100], _queries(50, seed=18)]
    ids = []
    for x in xs:
        ids.append(cb(x).ids)
    ref = torch.bincount(torch.cat(ids), minlength=5000).to(torch.int32)
    assert torch.equal(cb.usage, ref)
    cb.eval()
    cb(xs[0])
    assert torch.equal(cb.usage, ref)  # lookups outside training are not counted
    cb.usage[7] = torch.iinfo(torch.int32).max - 1
    cb.add_usage(torch.tensor([7]), torch.tensor([5]))
    assert int(cb.usage[7]) == torch.iinfo(torch.int32).max  # saturates, never wraps


def test_model_wide_update_reaches_the_codebook():
    cb = TernaryVQCodebook(1000, 64, exact_max=0, candidate_count=16)
    out = cb(_queries(64, seed=19))
    out.loss.backward()
    stats = UpdateStats()
    assert apply_ternary_update(cb, TernaryRule(threshold=1), stats, losses=[out.loss])
    assert stats.trit_flips > 0 and not cb.matrix.has_evidence


# -- memory and cost per step --------------------------------------------------------------------

def test_memory_bytes_per_trit_at_1m_rows(big):
    kinds = {k: (v.dtype, tuple(v.shape)) for k, v in big.state_dict().items()}
    assert kinds == {"matrix.packed": (torch.uint8, (BIG, 13)), "matrix.exponent": (torch.int8, (BIG,)),
                     "matrix.t_accum": (torch.int8, (BIG, 64)), "matrix.e_accum": (torch.int8, (BIG,)),
                     "usage": (torch.int32, (BIG,))}
    per_trit = big.state_bytes() / (BIG * 64)
    assert per_trit <= 1.3
    assert big.state_bytes() == BIG * 83  # 13 + 1 + 64 + 1 + 4 bytes per row


_VIEW_OPS = {"slice", "select", "view", "_unsafe_view", "detach", "alias", "t", "expand", "unsqueeze",
             "as_strided", "reshape", "squeeze", "lift_fresh"}
_ROW_OPS = {"index", "index_put_", "index_put", "_index_put_impl_", "index_select"}


class _TableAccess(TorchDispatchMode):
    """Records every aten op that touches the codebook's buffers other than through row indices
    or views, and every op whose output has >= num_codes elements."""

    def __init__(self, cb):
        super().__init__()
        self.tables = {b.untyped_storage().data_ptr() for b in cb.buffers()}
        self.limit, self.bad, self.rows = cb.num_codes, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if name not in _VIEW_OPS and any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr()
                                         in self.tables for a in leaves):
            if name in _ROW_OPS:
                where = args[2] if name == "index_select" else args[1]
                idx = [a for a in torch.utils._pytree.tree_leaves(where) if isinstance(a, torch.Tensor)]
                self.rows += sum(i.numel() for i in idx)
            else:
                self.bad.append(name)
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if name not in _VIEW_OPS | _ROW_OPS and any(o.numel() >= self.limit for o in outs):
            self.bad.append(name + " (output)")
        return out


def test_step_cost_does_not_scale_with_num_codes(big):
    before = {k: v.clone() for k, v in big.state_dict().items()}
    x = _queries(256, seed=20)
    big.train()
    with _TableAccess(big) as probe:
        out = big(x)
        out.loss.backward()
        big.apply_update(TernaryRule())
    assert probe.bad == []  # nothing but row-indexed reads/writes touched a table-sized tensor
    # Rows read or written through indices: candidates (fetch) + chosen rows (decode, update, usage),
    # a fixed multiple of queries x candidates, whatever num_codes is.
    assert 0 < probe.rows <= 256 * 64 * 2 + 256 * 16
    assert big.last_lookup["rows_fetched"] == 256 * 64
    big.load_state_dict(before)


# -- the two seed codebooks ----------------------------------------------------------------------

def test_shared_vq_bridge_shapes_weights_and_evidence():
    cfg = get_preset("arb-tiny")
    m = SharedVQ(cfg, generator=torch.Generator().manual_seed(0))
    weights = sum(t.rows * t.cols for _, t in ternary_matrices(m))
    assert weights == logical_ternary_weights(cfg)["Shared VQ + VQ bridge"]
    h = torch.randn(2, 7, cfg.d_model)
    out = m(h)
    assert out.hidden.shape == (2, 7, cfg.d_model) and out.ids.shape == (2, 7)
    assert out.ids.dtype == torch.int64 and not m.codebook.uses_candidates
    (out.hidden.square().mean() + out.loss).backward()
    assert all(t.has_evidence for _, t in ternary_matrices(m))


def test_kgvq_and_arb_small_take_the_candidate_path():
    cfg = get_preset("arb-small")
    kg = KGVQ(cfg)
    assert kg.num_codes == cfg.kgvq_size and kg.uses_candidates
    assert kg.candidate_count == cfg.vq_candidates
    out = kg(_queries(32, seed=21))
    assert kg.last_lookup["rows_fetched"] == 32 * cfg.vq_candidates
    assert out.ids.max() < cfg.kgvq_size


@pytest.mark.slow  # ~5 s on a free core, more on a busy one
def test_shared_vq_at_10m_rows():
    cfg = get_preset("arb-3b")
    m = SharedVQ(cfg)  # ~5 s on one free core: rows are drawn in blocks, 0.83 GB of state
    cb = m.codebook
    assert cb.num_codes == 10_000_000 and cb.uses_candidates
    assert cb.state_bytes() == 10_000_000 * 83  # 830 MB, 1.297 bytes per trit
    out = m(torch.randn(1, 16, cfg.d_model))
    out.loss.backward()
    assert cb.last_lookup["rows_fetched"] == 16 * cfg.vq_candidates
    assert cb.matrix.apply_update(TernaryRule())["rows"] == int(torch.unique(out.ids).numel())


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(num_codes=0), "num_codes must be an int >= 1, got 0"),
    (dict(num_codes=100, candidate_count=0), "candidate_count must be an int >= 1, got 0"),
    (dict(num_codes=100, candidate_count=101), "candidate_count must be <= num_codes (100), got 101"),
    (dict(num_codes=100, dim=0), "dim must be an int >= 1, got 0"),
    (dict(num_codes=100, cell_size=0), "cell_size must be an int >= 1, got 0"),
])
def test_bad_construction_raises(kw, msg):
    args = dict(candidate_count=16)
    args.update(kw)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        TernaryVQCodebook(args.pop("num_codes"), **args)


def test_bad_input_raises_and_leaves_codebook_unchanged():
    cb = TernaryVQCodebook(1000, 64, candidate_count=16, exact_max=0)
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    with pytest.raises(ValueError, match=r"last dimension 64, got shape \(3, 32\)"):
        cb(torch.randn(3, 32))
    with pytest.raises(ValueError, match="floating-point"):
        cb(torch.ones(3, 64, dtype=torch.int64))
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(5, 64)
        x[2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            cb(x)
    with pytest.raises(ValueError, match="candidate_count must be <= num_codes"):
        cb.candidate_count = 1001
    with pytest.raises(ValueError, match=r"last dimension 64 \(d_model\), got shape \(2, 63\)"):
        SharedVQ(get_preset("arb-tiny"))(torch.randn(2, 63))
    assert all(torch.equal(v, before[k]) for k, v in cb.state_dict().items())
    assert not cb.matrix.has_evidence


def test_empty_batch_gives_zero_loss():
    cb = TernaryVQCodebook(100, 64, candidate_count=8, exact_max=0)
    out = cb(torch.zeros(3, 0, 64))
    assert out.ids.shape == (3, 0) and out.quantized.shape == (3, 0, 64)
    assert float(out.loss.detach()) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lookups_equal_cpu_bit_for_bit():
    cb = TernaryVQCodebook(300_000, 64, candidate_count=64, exact_max=0)
    near = cb.decode_rows(torch.arange(0, 300_000, 300)) + 0.2 * _queries(1000, seed=23)
    x = torch.cat([_queries(2000, seed=22), near])
    cpu_c, cpu_e = cb.lookup(x), cb.lookup(x[:500], mode="exact")
    cb.cuda()
    xc = x.cuda()
    assert torch.equal(cb.lookup(xc).cpu(), cpu_c)
    assert torch.equal(cb.lookup(xc[:500], mode="exact").cpu(), cpu_e)
