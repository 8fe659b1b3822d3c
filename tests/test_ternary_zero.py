"""ZeRO-partitioned ternary accumulators (arbd/ternary/zero.py) against the dp = 1 reference.

The reference is one process accumulating the same micro-batches in rank order
(ARCHITECTURE.md, section 6); the partitioned runs must equal it bit for bit after every step.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from arbd.parallel.launch_utils import run_on_ranks
from arbd.ternary import (TernaryEmbeddingTable, TernaryLinear, TernaryMatrix, TernaryRMSNorm,
                          TernaryRule, TernaryUpdateMixin)
from arbd.ternary.rule import quantize_evidence, scale_votes
from arbd.ternary.update import commit_micro_batch
from arbd.ternary.zero import ZeroPartitioner, make_ternary_reducer, row_blocks
from arbd.train.optim import TernaryOptimizer

RULE = TernaryRule(threshold=6, evidence_rate=4.0, rounding="stochastic", scale_mode="norm",
                   scale_threshold=3, decay_shift=4)
PARTITIONED = ("a.weight", "b.weight", "c.weight")  # emb is sparse and norm.gain 1 column: replicated


class _Net(TernaryUpdateMixin, nn.Module):
    """Sparse table (replicated), 16x16 / 8x16 / 2x8 dense layers (partitioned; 2 rows over
    3 ranks leaves one rank an empty block), a norm gain (replicated)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = TernaryEmbeddingTable(20, 16, sparse=True, generator=gen)
        self.a = TernaryLinear(16, 16, generator=gen)
        self.norm = TernaryRMSNorm(16)
        self.b = TernaryLinear(16, 8, generator=gen)
        self.c = TernaryLinear(8, 2, generator=gen)
        self.ternary_rule = RULE

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.norm(self.a(self.emb(ids).mean(1)))))))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 20, (3, 4), generator=g), torch.randint(0, 2, (3,), generator=g))
            for _ in range(n)]


def _loss(net: _Net, ids: torch.Tensor, y: torch.Tensor, poison: bool = False) -> torch.Tensor:
    loss = nn.functional.cross_entropy(net(ids), y)
    return loss * float("nan") if poison else loss


def _snap(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- dp = 1 references -------------------------------------------------------------------------
def _reference(plan: list[int], mode: str, nan_at: tuple[int, int] | None = None,
               stats: list | None = None) -> list[dict]:
    """One process; step s accumulates plan[s] consecutive micro-batches (votes committed per
    micro-batch, or float gradients summed). nan_at = (step, micro-batch) poisons one loss.
    `stats`, if given, receives the run's UpdateStats."""
    net, mbs, out, k = _Net(), _batches(sum(plan)), [], 0
    for s, n in enumerate(plan):
        for i in range(n):
            loss = _loss(net, *mbs[k], poison=nan_at == (s, i))
            k += 1
            loss.backward()
            if mode == "votes":
                commit_micro_batch(net, net.ternary_rule, micro_batches=n)
        net.ternary_micro_batches = n
        net._ternary_update_memory(loss_signal=1.0)
        out.append(_snap(net))
    if stats is not None:
        stats.append(net.ternary_stats)
    return out


# -- multi-rank workers (module level: spawned) ------------------------------------------------
def _train(net: _Net, zp: ZeroPartitioner, rank: int, world: int, mbs: list, steps: range,
           use_optimizer: bool, nan_step: int = -1, nan_in: str = "loss") -> dict:
    net.ternary_micro_batches = world
    opt = TernaryOptimizer([nn.Parameter(torch.zeros(1))], net, micro_batches=world) if use_optimizer else None
    rec = {"full": [], "local": [], "applied": []}
    for s in steps:
        ids, y = mbs[s * world + rank] if isinstance(mbs, list) else mbs(s, rank)
        poison = s == nan_step and rank == 1
        loss = _loss(net, ids, y, poison=poison and nan_in == "loss")
        loss.backward()
        if poison and nan_in == "grad":  # a finite loss, one non-finite gradient entry in a row
            net.a.weight._grad[0, 3] = float("inf")  # that rank 0 owns: rank 1 alone sees it
        if opt is not None:  # the trainer's path: record, commit per micro-batch, step
            opt.record_loss(loss)
            opt.end_micro_batch()
            rec["applied"].append(opt.step())
        else:
            rec["applied"].append(net._ternary_update_memory(loss_signal=loss))
        rec["full"].append(zp.gather_full_state())
        rec["local"].append({n: (m.packed.clone(), m.exponent.clone())
                             for n, m in net.named_modules() if isinstance(m, TernaryMatrix)})
    rec["acc_bytes"] = zp.accumulator_bytes()
    rec["state_bytes"] = {p.name: p.matrix.state_bytes() for p in zp.parts}
    rec["blocks"] = {p.name: (p.matrix.row_start, p.matrix.row_stop) for p in zp.parts}
    rec["stats"] = zp.stats
    rec["update_stats"] = net.ternary_stats
    return rec


def _kernel_runs(rank: int, world: int) -> dict:
    """dp = 3 with the GPU update kernels (interpreted on CPU): the fused update of each row
    block (summed) and the touched-row kernel on it (votes). Counts the kernel launches, so a
    silent fallback to the torch rule cannot pass for the kernel path."""
    from arbd.ternary import state, triton_update
    launches = {"dense": 0, "rows": 0}

    def counting(kind, fn):
        def wrapped(*a, **k):
            launches[kind] += 1
            return fn(*a, **k)
        return wrapped

    saved = (state.DENSE_UPDATE_KERNEL, state.ROW_UPDATE_KERNEL, triton_update.dense_update_many,
             triton_update.apply_votes_rows)
    state.DENSE_UPDATE_KERNEL = state.ROW_UPDATE_KERNEL = "triton"
    triton_update.dense_update_many = counting("dense", triton_update.dense_update_many)
    triton_update.apply_votes_rows = counting("rows", triton_update.apply_votes_rows)
    out = {}
    try:
        net = _Net()
        zp = ZeroPartitioner(net, None, "summed", dtype=torch.float32)
        out["dp3_summed_kernel"] = _train(net, zp, rank, world, _batches(6), range(2), use_optimizer=False)
        out["dp3_summed_kernel"]["launches"] = dict(launches)
        net = _Net()
        zp = ZeroPartitioner(net, None, "votes")
        out["dp3_votes_kernel"] = _train(net, zp, rank, world, _batches(6), range(2), use_optimizer=True)
        out["dp3_votes_kernel"]["launches"] = dict(launches)
        out["kernel_failures"] = set(state._KERNEL_FAILED)

        def fails_to_compile(*a, **k):   # as triton 3.6 does for some widths (state._kernel_or_none)
            raise RuntimeError("PassManager::run failed")

        triton_update.dense_update_many = fails_to_compile
        net = _Net()
        zp = ZeroPartitioner(net, None, "summed", dtype=torch.float32)
        with pytest.warns(UserWarning, match="failed to compile"):
            out["dp3_summed_fallback"] = _train(net, zp, rank, world, _batches(6), range(2),
                                                use_optimizer=False)
        out["fallback_failures"] = set(state._KERNEL_FAILED)
    finally:
        state._KERNEL_FAILED.clear()
        (state.DENSE_UPDATE_KERNEL, state.ROW_UPDATE_KERNEL, triton_update.dense_update_many,
         triton_update.apply_votes_rows) = saved
    return out


def _worker(rank: int, world: int) -> dict:
    """One 3-rank job (spawning is the slow part): dp = 3 runs, then dp = 2 runs over ranks 0-1."""
    torch.set_num_threads(1)
    out: dict = {}
    g2 = dist.new_group([0, 1])
    mbs = _batches(10)
    net = _Net()
    zp = ZeroPartitioner(net, None, "votes", exchange="reduce_scatter")
    out["dp3"] = _train(net, zp, rank, world, mbs, range(2), use_optimizer=True)
    full = zp.gather_full_state()
    zp.unpartition()  # every rank takes the whole accumulators back
    out["unpartitioned"] = (_snap(net), net.ternary_evidence_reducer)
    if rank < 2:  # re-partition the gathered state at dp = 2 and go on
        net2 = _Net()
        zp2 = ZeroPartitioner(net2, g2, "votes")
        zp2.load_full_state(full)
        out["dp3_then_dp2"] = _train(net2, zp2, rank, 2, lambda s, r: mbs[6 + 2 * (s - 2) + r],
                                     range(2, 4), use_optimizer=True)
    net = _Net()
    zp = ZeroPartitioner(net, None, "summed", dtype=torch.float32)
    out["dp3_summed"] = _train(net, zp, rank, world, _batches(6), range(2), use_optimizer=False)
    out.update(_kernel_runs(rank, world))
    if rank >= 2:
        return out
    net = _Net()
    zp = ZeroPartitioner(net, g2, "votes")
    out["votes"] = _train(net, zp, rank, 2, _batches(8), range(4), use_optimizer=True, nan_step=2)
    net = _Net()
    zp = ZeroPartitioner(net, g2, "summed", dtype=torch.float32)
    out["summed"] = _train(net, zp, rank, 2, _batches(6), range(3), use_optimizer=False)
    net = _Net()
    zp = ZeroPartitioner(net, g2, "summed", dtype=torch.float32, exchange="reduce_scatter")
    out["summed_rs"] = _train(net, zp, rank, 2, _batches(6), range(3), use_optimizer=False,
                              nan_step=1, nan_in="grad")
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_worker, 3)


@pytest.fixture(scope="module")
def dp2(ranks) -> list[dict]:
    return ranks[:2]


@pytest.fixture(scope="module")
def dp3(ranks) -> list[dict]:
    return ranks


def _check_equal(runs: list[dict], ref: list[dict], world: int) -> None:
    for step, want in enumerate(ref):
        for r in range(world):
            assert _same(runs[r]["full"][step], want), f"rank {r} differs from dp=1 after step {step}"
            # every rank holds the same packed trits and exponents of every matrix
            for name, (p, e) in runs[r]["local"][step].items():
                assert torch.equal(p, runs[0]["local"][step][name][0]), f"{name} packed, rank {r}"
                assert torch.equal(e, runs[0]["local"][step][name][1]), f"{name} exponent, rank {r}"


# -- tests ----------------------------------------------------------------------------------------
def test_row_blocks_are_contiguous_uneven_and_cover_every_row():
    assert row_blocks(16, 3) == [(0, 6), (6, 11), (11, 16)]
    assert row_blocks(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert row_blocks(8, 2) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        row_blocks(4, 0)


def test_block_quantisation_with_a_gathered_scale_norm_equals_the_whole_matrix():
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(7, 16, generator=g)
    m = TernaryMatrix(7, 16, generator=g)
    trits = m.trits()
    want_q = quantize_evidence(grad, RULE)
    want_e = scale_votes(grad, trits, m.exponent, RULE)
    assert want_q.abs().sum() > 0 and want_e.abs().sum() > 0
    g_e = torch.cat([m.scale_grad(grad[a:b], torch.arange(a, b)) for a, b in row_blocks(7, 3)])
    mean_abs = g_e.abs().mean()  # what the ranks compute from the all-gathered rows
    for a, b in row_blocks(7, 3):
        ids = torch.arange(a, b)
        assert torch.equal(quantize_evidence(grad[a:b], RULE, row_ids=ids), want_q[a:b])
        # the partitioner's block path (zero.py): TernaryMatrix.quantize with the gathered mean
        q, e = m.quantize(grad[a:b], RULE, ids, mean_abs=mean_abs)
        assert torch.equal(q, want_q[a:b].to(torch.int32))
        assert torch.equal(e, want_e[a:b].to(torch.int32))


def test_partitioned_matrix_frees_accumulators_refuses_whole_updates_and_round_trips():
    m = TernaryMatrix(10, 20)
    full_bytes = m.state_bytes()
    assert full_bytes == 10 * 4 + 10 + 10 * 20 + 10
    m.t_accum.copy_(torch.arange(200).reshape(10, 20) % 7)
    t, e = m.t_accum.clone(), m.e_accum.clone()
    m.partition_rows(4, 7)
    assert m.is_partitioned and tuple(m.t_accum.shape) == (3, 20)
    assert torch.equal(m.t_accum, t[4:7])
    assert m.state_bytes() == 10 * 4 + 10 + 3 * 20 + 3
    m.add_grad(torch.ones(10, 20))
    with pytest.raises(RuntimeError, match="ZeroPartitioner"):
        m.apply_update(RULE)
    m.clear_evidence()
    m.unpartition(t, e)
    assert not m.is_partitioned and m.state_bytes() == full_bytes and torch.equal(m.t_accum, t)


@pytest.mark.parametrize("mode", ["votes", "summed"])
def test_one_process_partitioner_equals_the_plain_update(mode):
    """dp = 1 through the partitioner (one block per matrix, no collectives) = no partitioner."""
    plan = [2, 2, 2]
    ref = _reference(plan, mode)
    net, mbs, k = _Net(), _batches(6), 0
    zp = ZeroPartitioner(net, None, mode)  # bf16 wire dtype: unused with nothing to send
    assert net.ternary_evidence_reducer is zp and [p.name for p in zp.parts] == list(PARTITIONED)
    for s, n in enumerate(plan):
        for _ in range(n):
            _loss(net, *mbs[k]).backward()
            k += 1
            if mode == "votes":
                commit_micro_batch(net, net.ternary_rule, micro_batches=n)
        net.ternary_micro_batches = n
        assert net._ternary_update_memory(loss_signal=1.0)
        assert _same(zp.gather_full_state(), ref[s])
    assert not _same(ref[-1], _snap(_Net())), "the updates changed nothing"
    assert net.ternary_stats.trit_flips > 0


def test_dp2_votes_equal_dp1_bit_for_bit_with_half_the_accumulators_and_nan_in_lockstep(dp2):
    runs, ref_stats = [r["votes"] for r in dp2], []
    ref = _reference([2, 2, 2, 2], "votes", nan_at=(2, 1), stats=ref_stats)
    _check_equal(runs, ref, 2)
    assert runs[0]["applied"] == runs[1]["applied"] == [True, True, False, True]
    # the flip and move counts are totals over all rows, the same on every rank as at dp = 1
    for r in range(2):
        got = runs[r]["update_stats"]
        assert (got.applied, got.trit_flips, got.scale_moves) == \
            (ref_stats[0].applied, ref_stats[0].trit_flips, ref_stats[0].scale_moves)
    assert ref_stats[0].trit_flips > 0 and ref_stats[0].scale_moves > 0
    assert _same(ref[1], ref[2]) and not _same(ref[2], ref[3]) and not _same(ref[0], ref[1])
    # accumulators: rank 0 rows a[0:8], b[0:4], c[0:1]; rank 1 a[8:16], b[4:8], c[1:2]
    assert runs[0]["blocks"] == {"a.weight": (0, 8), "b.weight": (0, 4), "c.weight": (0, 1)}
    assert runs[0]["acc_bytes"] == 8 * 17 + 4 * 17 + 1 * 9 == 213
    assert runs[1]["acc_bytes"] == 8 * 17 + 4 * 17 + 1 * 9
    full_acc = 16 * 17 + 8 * 17 + 2 * 9
    assert runs[0]["acc_bytes"] + runs[1]["acc_bytes"] == full_acc
    # a 16x16: packed 16*4 + exponents 16 + its 8 rows of accumulators (8*16 + 8)
    assert runs[1]["state_bytes"]["a.weight"] == 64 + 16 + 136
    # wire, per applied step (3 of them): int8 votes + one scale vote per row to the other rank
    st0, st1 = runs[0]["stats"], runs[1]["stats"]
    assert st0.calls == st1.calls == 3  # the NaN step stopped before the exchange
    assert st0.exchange_bytes == 3 * (8 * 17 + 4 * 17 + 1 * 9)
    # all-gather: own block padded to the largest, packed bytes + exponent byte per row
    assert st0.gather_bytes == st1.gather_bytes == 3 * (8 * 5 + 4 * 5 + 1 * 3)
    weights = 16 * 16 + 8 * 16 + 2 * 8
    assert st0.weights == weights
    assert st0.bytes_per_weight_per_step == pytest.approx((213 + 63) / weights)


def test_dp2_summed_fp32_equals_dp1_float_accumulation_both_exchanges(dp2):
    runs = [r["summed"] for r in dp2]
    _check_equal(runs, _reference([2] * 3, "summed"), 2)
    assert all(runs[0]["applied"]) and all(runs[1]["applied"])
    # reduce_scatter, and an inf in rank 1's gradient of a row rank 0 owns: both ranks skip step 1
    runs = [r["summed_rs"] for r in dp2]
    ref = _reference([2] * 3, "summed", nan_at=(1, 1))
    _check_equal(runs, ref, 2)
    assert runs[0]["applied"] == runs[1]["applied"] == [True, False, True]
    assert _same(ref[0], ref[1])
    assert [r["update_stats"].skipped_nonfinite_grad for r in runs] == [1, 1]  # finite losses
    st = dp2[0]["summed"]["stats"]
    assert st.exchange_bytes == 3 * 4 * (8 * 16 + 4 * 16 + 1 * 8)  # fp32 rows to the other rank
    assert st.control_bytes > 0  # flags, dL/dE rows for the scale norm, counters


def test_dp3_uneven_blocks_votes_then_repartitioned_at_dp2(dp3):
    runs = [r["dp3"] for r in dp3]
    ref = _reference([3, 3, 2, 2], "votes")
    _check_equal(runs, ref[:2], 3)
    assert [r["blocks"]["c.weight"] for r in runs] == [(0, 1), (1, 2), (2, 2)]
    for r in dp3:
        assert _same(r["unpartitioned"][0], ref[1]) and r["unpartitioned"][1] is None
    assert [r["acc_bytes"] for r in runs] == [6 * 17 + 3 * 17 + 9, 5 * 17 + 3 * 17 + 9, 5 * 17 + 2 * 17]
    # reduce_scatter pads to the largest block: rank 0's segment, 2 ring hops, int8
    seg = 6 * 17 + 3 * 17 + 1 * 9
    assert runs[2]["stats"].exchange_bytes == 2 * 2 * seg
    later = [r["dp3_then_dp2"] for r in dp3[:2]]
    for step in range(2):
        for r in range(2):
            assert _same(later[r]["full"][step], ref[2 + step]), f"dp=2 after re-partition, step {step}"
    assert later[0]["blocks"]["a.weight"] == (0, 8)


def test_dp3_summed_fp32_all_to_all_adds_in_rank_order(dp3):
    runs = [r["dp3_summed"] for r in dp3]
    _check_equal(runs, _reference([3, 3], "summed"), 3)


def test_dp3_block_updates_through_the_gpu_kernels_equal_the_torch_rule_at_dp1(dp3):
    """The GPU path of the partitioned update (interpreted here): the fused dense update of each
    rank's row block, hashed at global rows with the all-gathered "norm" scale mean, and the
    touched-row kernel on the block for integer votes; every step equal to dp = 1's torch rule."""
    assert all(not r["kernel_failures"] for r in dp3)
    summed = [r["dp3_summed_kernel"] for r in dp3]
    _check_equal(summed, _reference([3, 3], "summed"), 3)
    votes = [r["dp3_votes_kernel"] for r in dp3]
    ref_stats = []
    _check_equal(votes, _reference([3, 3], "votes", stats=ref_stats), 3)
    for r in dp3:
        assert r["dp3_summed_kernel"]["launches"]["dense"] >= 2   # one group per step at least
        assert r["dp3_votes_kernel"]["launches"]["rows"] > r["dp3_summed_kernel"]["launches"]["rows"]
    # the counts, read once per step from the device, are the dp = 1 totals on every rank
    for run in votes:
        got = run["update_stats"]
        assert (got.trit_flips, got.scale_moves) == (ref_stats[0].trit_flips, ref_stats[0].scale_moves)
    assert ref_stats[0].trit_flips > 0 and ref_stats[0].scale_moves > 0
    # A width the fused update cannot compile: its blocks, evidence already taken, fall back to
    # the torch rule in the same step and still equal dp = 1.
    # (rank 2's block of the 2-row c is empty: it never tries c's 8-column width)
    assert [("dense", 8) in r["fallback_failures"] for r in dp3] == [True, True, False]
    assert all(("dense", 16) in r["fallback_failures"] for r in dp3)
    _check_equal([r["dp3_summed_fallback"] for r in dp3], _reference([3, 3], "summed"), 3)


def test_make_ternary_reducer_follows_the_zero_stage():
    from arbd.ternary.dp import DPEvidenceReducer
    net = _Net()
    assert isinstance(make_ternary_reducer(net, zero_stage=0, mode="votes"), DPEvidenceReducer)
    assert not net.a.weight.is_partitioned
    zp = make_ternary_reducer(net, zero_stage=1, mode="votes")
    assert isinstance(zp, ZeroPartitioner) and net.ternary_evidence_reducer is zp
    assert net.a.weight.is_partitioned is False  # one process: its block is every row
    with pytest.raises(ValueError):
        make_ternary_reducer(_Net(), zero_stage=-1)
    assert zp.partitioned_weights() == 16 * 16 + 8 * 16 + 2 * 8
