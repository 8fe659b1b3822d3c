"""The Triton touched-row update (triton_update.apply_votes_rows) against TernaryMatrix's torch
path: after the same integer votes on the same rows, every byte of packed trits, accumulators,
exponents and scale accumulators must be identical, and so must the flip / scale-move counts.

On CPU the kernel runs through TRITON_INTERPRET=1; on the GPU machine run with TRITON_INTERPRET=0
to compile it (every test then compares the compiled kernel with the torch rule)."""

import copy

import pytest
import torch

pytest.importorskip("triton")

from arbd.ternary import cuda_ext, cuda_rows  # noqa: E402
from arbd.ternary import triton_update as tk  # noqa: E402
from arbd.ternary.rule import MIN_ROW_FOR_ROW_NORM, TUNED_RULE, TernaryRule  # noqa: E402
from arbd.ternary.state import TernaryMatrix, row_records  # noqa: E402


@pytest.fixture(autouse=True)
def _row_votes_path(monkeypatch):
    """Float row evidence on the GPU now takes the fused dense kernel with row ids
    (tests/test_triton_dense_update.py); here it must reach the touched-row votes kernel."""
    from arbd.ternary import state
    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "torch")

if type(tk._apply_votes_kernel).__name__ != "InterpretedFunction" and not torch.cuda.is_available():
    pytest.skip("no CUDA and the Triton interpreter could not be enabled", allow_module_level=True)
DEVICE = "cpu" if type(tk._apply_votes_kernel).__name__ == "InterpretedFunction" else "cuda"

RULES = [TUNED_RULE, TernaryRule(),
         TernaryRule(threshold=5, decay_shift=3, saturated_cap=20, scale_threshold=3),
         TernaryRule(learn_scales=False, threshold=100)]


def _random_matrix(rows, cols, g):
    m = TernaryMatrix(rows, cols, generator=g)
    m.t_accum.copy_(torch.randint(-127, 128, m.t_accum.shape, generator=g).to(torch.int8))
    m.e_accum.copy_(torch.randint(-127, 128, (rows,), generator=g).to(torch.int8))
    m.exponent.copy_(torch.randint(-128, 128, (rows,), generator=g).to(torch.int8))
    return m


def _check_against_torch(cols, rule, rows, u, seed, vote_dtype=torch.int32, launch=None,
                         offset=0, record=False, **kernel_args):
    """launch (default tk.apply_votes_rows) on a random state and votes against the torch rule.
    offset: the votes and t_accum start that many elements into a larger buffer. record: the
    state lives in one row record per row (state.row_records), so every buffer is strided (then
    only the votes are offset)."""
    g = torch.Generator().manual_seed(seed)
    ref = _random_matrix(rows, cols, g)
    got = copy.deepcopy(ref).to(DEVICE)
    if record:
        views = row_records(rows, cols, DEVICE)[1:]
        for name, view in zip(("packed", "t_accum", "exponent", "e_accum"), views):
            view.copy_(getattr(ref, name))
            setattr(got, name, view)
    if offset and not record:
        buf = torch.zeros(rows * cols + offset, dtype=torch.int8, device=DEVICE)
        got.t_accum = buf[offset:].view(rows, cols)
        got.t_accum.copy_(ref.t_accum)
    idx = torch.randperm(rows, generator=g)[:u]
    lim = 300 if vote_dtype != torch.int8 else 127
    votes = torch.randint(-lim, lim + 1, (u, cols), generator=g, dtype=torch.int32)
    e_votes = torch.randint(-60, 61, (u,), generator=g, dtype=torch.int32)
    ref.set_votes(idx, votes, e_votes)
    want = ref.apply_update(rule)
    dev_votes = votes.to(vote_dtype).to(DEVICE)
    if offset:
        dev_votes = torch.cat([dev_votes.new_zeros(offset), dev_votes.reshape(-1)])[offset:].view(u, cols)
    before = [getattr(got, name)._version for name in ("packed", "t_accum", "exponent", "e_accum")]
    stats = (launch or tk.apply_votes_rows)(got.packed, got.t_accum, got.exponent, got.e_accum,
                                            idx.to(DEVICE), dev_votes,
                                            e_votes.to(vote_dtype).to(DEVICE), rule, **kernel_args)
    if launch is None:  # every path of apply_votes_rows marks what it wrote (caches key on versions)
        after = [getattr(got, name)._version for name in ("packed", "t_accum", "exponent", "e_accum")]
        assert all(a > b for a, b in zip(after, before)), (before, after)
    for name in ("packed", "t_accum", "exponent", "e_accum"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name)), name
    assert stats.tolist() == [want["trit_flips"], want["scale_moves"]]
    return want


# 8-16 columns: the widths triton 3.6 could not compile the earlier gather kernel for. 128 is
# the widest whole row; 129, 251 and 300 go in chunks of 125 (row_chunking): a chunk of 4
# columns, a last column alone in its byte, three chunks.
@pytest.mark.parametrize("cols", [64, 37, 1, 8, 12, 13, 16, 24, 100, 128, 129, 251, 300])
@pytest.mark.parametrize("rule", RULES, ids=["tuned", "default", "cap_decay", "no_scales"])
def test_apply_votes_rows_equals_torch(cols, rule):
    # 77 rows: no multiple of the row block. TUNED_RULE freezes rows under 8 columns.
    want = _check_against_torch(cols, rule, 300, 77, cols)
    assert want["trit_flips"] > 0 or cols == 1


# Both packings, several blocks per program (the grid is sized to the GPU: 4 "SMs" under the
# interpreter, 132 on an H100, so 300 / 7000 rows in blocks of 16 give each program several),
# block tails, with and without the streaming hint. "gather" only for rows of 8+ packed bytes:
# triton 3.6 cannot compile it for narrower ones (row_packing never picks it there).
ROWS, TOUCHED = (600, 300) if DEVICE == "cpu" else (9000, 7000)


@pytest.mark.parametrize("cols,knobs", [
    (64, dict(packing_mode="gather")),
    (37, dict(packing_mode="gather", block_r=16, num_warps=4, programs_per_sm=1)),
    (64, dict(packing_mode="gather", block_r=32, num_warps=8, programs_per_sm=2,
              evict_first=False)),
    (64, dict(packing_mode="scan")),
    (64, dict(packing_mode="scan", block_r=16, num_warps=4, programs_per_sm=1)),
    (13, dict(packing_mode="scan", block_r=64, num_warps=4, programs_per_sm=None)),
    (16, dict(packing_mode="scan", block_r=16, num_warps=2, programs_per_sm=1)),
    (252, dict(packing_mode="gather", block_r=32, num_warps=8, programs_per_sm=2)),
    (252, dict(packing_mode="scan")),
], ids=["g64", "g37_p1", "g64_w8_noevict", "s64", "s64_p1", "s13_oneblock", "s16_w2_p1",
        "g252_chunks_p2", "s252_chunks"])
def test_packings_and_block_loop_equal_torch(cols, knobs):
    _check_against_torch(cols, TernaryRule(threshold=5, decay_shift=3, saturated_cap=20,
                                           scale_threshold=3), ROWS, TOUCHED, 11 + cols, **knobs)


# The state as one record per row: every buffer strided, t_accum's 8-byte loads still aligned.
@pytest.mark.parametrize("cols,knobs", [
    (64, dict(packing_mode="gather")), (37, dict(packing_mode="gather")),
    (64, dict(packing_mode="scan")), (13, dict(packing_mode="scan")), (1, dict()),
], ids=["g64", "g37", "s64", "s13", "default1"])
def test_row_records_equal_torch(cols, knobs):
    _check_against_torch(cols, TUNED_RULE, 300, 77, 400 + cols, record=True, **knobs)


def test_a_buffer_with_strided_columns_is_refused():
    every_other = torch.zeros(10, 16, dtype=torch.int8)[:, ::2]
    with pytest.raises(ValueError, match="unit column stride"):
        tk.apply_votes_rows(torch.zeros(10, 2, dtype=torch.uint8), every_other,
                            torch.zeros(10, dtype=torch.int8), torch.zeros(10, dtype=torch.int8),
                            torch.arange(3), torch.zeros(3, 8, dtype=torch.int32), None, TUNED_RULE)


# The CUDA kernel (csrc/rows.cu), which apply_votes_rows takes by default on a GPU for updates
# of up to cuda_rows.AUTO_MAX_ROWS rows of up to 64 trits: every width's byte split between lanes,
# the element-wise loads of widths that are no multiple of 8, each rows-in-flight count, grids
# smaller than the rows (the warp loop), narrow votes, buffers that start at an odd element.
needs_cuda_rows = pytest.mark.skipif(DEVICE != "cuda" or cuda_ext.nvcc() is None,
                                     reason="needs a CUDA GPU and nvcc")


@pytest.mark.gpu
@needs_cuda_rows
@pytest.mark.parametrize("cols", [64, 63, 37, 24, 21, 16, 13, 8, 5, 1])
@pytest.mark.parametrize("rule", RULES, ids=["tuned", "default", "cap_decay", "no_scales"])
def test_cuda_kernel_equals_torch(cols, rule):
    want = _check_against_torch(cols, rule, ROWS, TOUCHED, 200 + cols, packing_mode="cuda")
    frozen = rule.freeze_short_rows and cols < MIN_ROW_FOR_ROW_NORM
    assert want["trit_flips"] > 0 or cols == 1 or frozen


@pytest.mark.gpu
@needs_cuda_rows
@pytest.mark.parametrize("cols,vote_dtype,knobs", [
    (64, torch.int32, dict(rows_in_flight=1, blocks_per_sm=1)),
    (64, torch.int32, dict(rows_in_flight=4, blocks_per_sm=8)),
    (37, torch.int32, dict(rows_in_flight=2, blocks_per_sm=1)),
    (64, torch.int16, dict(rows_in_flight=4, blocks_per_sm=1)),
    (64, torch.int8, dict(rows_in_flight=2)),
    (50, torch.int16, dict(rows_in_flight=1)),
    (64, torch.int32, dict(offset=1)),
    (64, torch.int16, dict(offset=3, rows_in_flight=4)),
    (16, torch.int8, dict(offset=1, rows_in_flight=1, blocks_per_sm=1)),
    (64, torch.int32, dict(record=True, kernel="rows")),
    (37, torch.int16, dict(record=True, rows_in_flight=2)),
    (5, torch.int32, dict(record=True)),
], ids=["r1_b1", "r4_b8", "odd37_b1", "i16_r4", "i8", "i16_50", "unaligned", "unaligned_i16",
        "unaligned_i8_16", "record64_rows_kernel", "record37_i16", "record5"])
def test_cuda_kernel_launches_equal_torch(cols, vote_dtype, knobs):
    _check_against_torch(cols, TernaryRule(threshold=5, decay_shift=3, saturated_cap=20,
                                           scale_threshold=3), ROWS, TOUCHED, 31 + cols,
                         vote_dtype=vote_dtype, launch=cuda_rows.apply_votes_rows, **knobs)


def test_cuda_switch_and_a_failed_build():
    """ARBD_CUDA_ROWS is checked; "auto" falls back to Triton (one warning) when the build fails,
    silently without nvcc; "on" raises. No GPU needed: a stand-in tensor says it lives on CUDA."""
    import warnings
    from types import SimpleNamespace

    fake = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("ARBD_CUDA_ROWS", "sometimes")
        with pytest.raises(ValueError, match="one of auto, on, off"):
            cuda_rows.mode()
        mp.setattr(cuda_rows, "_LIB", None)
        mp.setattr(cuda_rows, "_BUILD_FAILED", None)
        mp.setattr(cuda_ext, "load", _raiser("nvcc failed on rows.cu: error: something"))
        mp.setattr(cuda_ext, "nvcc", lambda: "/usr/local/cuda/bin/nvcc")
        mp.setenv("ARBD_CUDA_ROWS", "off")
        assert not cuda_rows.usable(fake, 64, 100)
        mp.setenv("ARBD_CUDA_ROWS", "auto")
        assert not cuda_rows.usable(fake, 65, 100)  # too wide: never tried
        assert not cuda_rows.usable(fake, 64, cuda_rows.AUTO_MAX_ROWS + 1)  # Triton's range
        with pytest.warns(UserWarning, match="Triton kernel runs instead"):
            assert not cuda_rows.usable(fake, 64, 100)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cuda_rows.usable(fake, 64, 100)  # remembered: no second build or warning
            # no nvcc at all (a runtime-only image): Triton, silently
            mp.setattr(cuda_rows, "_BUILD_FAILED", None)
            mp.setattr(cuda_ext, "nvcc", lambda: None)
            assert not cuda_rows.usable(fake, 64, 100)
        mp.setenv("ARBD_CUDA_ROWS", "on")
        with pytest.raises(RuntimeError, match="nvcc failed"):
            cuda_rows.usable(fake, 64, cuda_rows.AUTO_MAX_ROWS + 1)
    finally:
        mp.undo()


def test_row_packing_avoids_gather_on_narrow_rows():
    assert [tk.row_packing(c) for c in (1, 8, 13, 16, 20, 21, 24, 64, 100)] == \
        ["scan"] * 5 + ["gather"] * 4


@pytest.mark.parametrize("vote_dtype", [torch.int16, torch.int8], ids=["int16", "int8"])
def test_narrow_votes_equal_torch(vote_dtype):
    """int16 / int8 votes are read as they are and widened in the kernel."""
    _check_against_torch(64, TUNED_RULE, 300, 120, 3, vote_dtype=vote_dtype)


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
    """A row kernel that fails to compile (as triton 3.6 did for 8-16-column rows before the
    "scan" packing) leaves the matrix on the torch rule (same bytes) with one warning, instead of
    failing the step. Other errors still surface."""
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


@pytest.mark.parametrize("path", ["dense", "rows"])
def test_kernel_updates_invalidate_a_held_decoded_weight(path, monkeypatch):
    """A decoded W that a live graph still holds (TernaryMatrix.decoded_shared) must not be reused
    after an update the kernels wrote through raw pointers: they bump the buffers' versions."""
    from arbd.ternary import packing, state
    from arbd.ternary.layers import TernaryLinear

    monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "triton")
    monkeypatch.setattr(state, "ROW_UPDATE_KERNEL", "triton")
    rule = TernaryRule(threshold=1)
    layer = TernaryLinear(64, 16, generator=torch.Generator().manual_seed(3), device=DEVICE)
    m = layer.weight
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    keep = layer(x)   # its graph holds the decoded W (16 rows <= 32)
    if path == "dense":
        layer(x).pow(2).sum().mul(1e4).backward()
    else:
        m.add_row_grad(torch.arange(16, device=DEVICE), 1e4 * torch.randn(16, 64, device=DEVICE))
    before = m.packed.clone()
    m.apply_update(rule)
    assert not torch.equal(m.packed, before), "the update moved no trit: the test shows nothing"
    fresh = packing.decode(m.packed, m.exponent, 64, torch.float32)   # same device, same product
    assert torch.equal(layer(x), x @ fresh.t())
    del keep


# The record kernel (64-trit row records, a warp stages 32 rows in shared memory): every rule and
# vote width; misaligned votes fall back to the four-rows-per-warp kernel.
@pytest.mark.gpu
@needs_cuda_rows
@pytest.mark.parametrize("rule", RULES, ids=["tuned", "default", "cap_decay", "no_scales"])
@pytest.mark.parametrize("vote_dtype", [torch.int32, torch.int16, torch.int8],
                         ids=["i32", "i16", "i8"])
def test_cuda_record_kernel_equals_torch(rule, vote_dtype):
    want = _check_against_torch(64, rule, ROWS, TOUCHED, 500, vote_dtype=vote_dtype, record=True,
                                launch=cuda_rows.apply_votes_rows, kernel="record")
    assert want["trit_flips"] > 0


# The record kernel's tiles: one partial tile (5 rows), a full one and one row more (33), and a
# grid (one block per SM) that each warp walks many times over (60,000 rows: its double buffer),
# with each vote width (the chunks' vote loads differ by width).
@pytest.mark.gpu
@needs_cuda_rows
@pytest.mark.parametrize("rows,u,knobs", [
    (64, 5, {}), (64, 33, {}), (100_000, 60_000, dict(blocks_per_sm=1))],
    ids=["5", "33", "loop"])
@pytest.mark.parametrize("vote_dtype", [torch.int32, torch.int16, torch.int8],
                         ids=["i32", "i16", "i8"])
def test_record_kernel_tiles_equal_torch(rows, u, knobs, vote_dtype):
    want = _check_against_torch(64, TUNED_RULE, rows, u, 502, vote_dtype=vote_dtype, record=True,
                                launch=cuda_rows.apply_votes_rows, kernel="record", **knobs)
    assert want["trit_flips"] > 0


@pytest.mark.gpu
@needs_cuda_rows
@pytest.mark.parametrize("knobs", [dict(blocks_per_sm=1), dict(offset=4)], ids=["b1", "unaligned"])
def test_cuda_record_kernel_launches_equal_torch(knobs):
    _check_against_torch(64, TernaryRule(threshold=5, decay_shift=3, saturated_cap=20,
                                         scale_threshold=3), ROWS, TOUCHED, 501, record=True,
                         launch=cuda_rows.apply_votes_rows, **knobs)


def test_record_base_accepts_only_the_row_record_views():
    rec, packed, t_acc, exp, e_acc = row_records(10, 64)
    assert cuda_rows.record_base(packed, t_acc, exp, e_acc) == (rec.data_ptr(), 80)
    assert cuda_rows.record_base(packed, t_acc, e_acc, exp) is None          # fields swapped
    assert cuda_rows.record_base(packed.clone(), t_acc, exp, e_acc) is None  # not one record
    assert cuda_rows.record_base(*row_records(10, 37)[1:]) is None           # not 64 trits
