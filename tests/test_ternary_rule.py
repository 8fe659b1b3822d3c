"""The ternary update rule (arbd/ternary/rule.py), its integer vote path and the dp reductions."""
import copy
import math
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from arbd.model.ste import absmean_ternary
from arbd.ternary import (TernaryEmbeddingTable, TernaryLinear, TernaryRMSNorm, TernaryRule,
                          TernaryUpdateMixin, ternary_matrices)
from arbd.ternary.rule import (TUNED_RULE, apply_votes, hash_uniform, quantize_evidence, scale_votes,
                               update_rows)
from arbd.ternary.update import commit_micro_batch
from arbd.train.schedule import warmup_cosine


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- quantisation, by hand -------------------------------------------------------------------
def test_row_normalised_votes_by_hand():
    g = torch.tensor([[-2.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, -4.0]])  # mean |g| = 1.25
    rule = TernaryRule(evidence_rate=2.5, rounding="nearest")
    # -g / 1.25 * 2.5 = -2 g
    assert quantize_evidence(g, rule).tolist() == [[4, -2, 0, -2, 0, 0, -4, 8]]
    clamped = TernaryRule(evidence_rate=2.5, rounding="nearest", max_vote=3)
    assert quantize_evidence(g, clamped).tolist() == [[3, -2, 0, -2, 0, 0, -3, 3]]
    assert quantize_evidence(g, rule).dtype == torch.int16


def test_short_rows_normalise_over_the_tensor():
    g = torch.tensor([[1.0], [-2.0], [3.0]])  # a norm gain: 3 rows of 1; tensor mean |g| = 2
    rule = TernaryRule(evidence_rate=2.0, rounding="nearest")
    assert quantize_evidence(g, rule).flatten().tolist() == [-1, 2, -3]


def test_stochastic_rounding_is_unbiased_deterministic_and_layout_free():
    torch.manual_seed(0)
    g = torch.randn(64, 256) * 1e-3 + 3e-4
    rule = TernaryRule(evidence_rate=0.7, rounding="stochastic")
    q = quantize_evidence(g, rule)
    x = -g / g.abs().mean(1, keepdim=True) * 0.7
    assert (q.float() - x).abs().max() < 1.0  # always one of the two neighbours
    assert abs(float(q.float().mean() - x.mean())) < 0.01  # unbiased (16k entries)
    assert torch.equal(q, quantize_evidence(g.clone(), rule))  # no hidden RNG state
    # Rows quantised in two blocks, in the other order, with their global ids: the same votes.
    ids = torch.arange(64)
    top = quantize_evidence(g[32:], rule, row_ids=ids[32:])
    bottom = quantize_evidence(g[:32], rule, row_ids=ids[:32])
    assert torch.equal(torch.cat([bottom, top]), q)
    # ...while the wrong ids give other roundings (the place enters the hash).
    assert not torch.equal(quantize_evidence(g[32:], rule), top)
    u = hash_uniform(g)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01


def test_scale_votes_by_hand():
    trits = torch.tensor([[1, 0, -1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.int8)
    exponent = torch.tensor([0, 16], dtype=torch.int8)  # scales 1 and 2
    g = torch.zeros(2, 8)
    g[0, 0], g[0, 2] = 1.0, 1.0       # sum g*t = 1 - 1 = 0: no pull
    g[1] = -0.5                        # sum g*t = -4 < 0: growing the scale lowers the loss
    sign = TernaryRule(scale_rate=3.0, scale_mode="sign", rounding="nearest")
    assert scale_votes(g, trits, exponent, sign).tolist() == [0, 3]
    g[0, 2] = 0.0                      # row 0: sum g*t = +1, dL/dE_0 = ln2/16; row 1: -8 ln2/16 * ... * 2
    norm = TernaryRule(scale_rate=1.0, scale_mode="norm", rounding="nearest")
    # dL/dE = ln2/16 * [1 * 1, 2 * (-4)] -> [1, -8] / mean 4.5 -> votes round([-0.22, 1.78]) = [0, 2]
    assert scale_votes(g, trits, exponent, norm).tolist() == [0, 2]
    assert scale_votes(g, trits, exponent, TernaryRule(learn_scales=False)).tolist() == [0, 0]


# -- the integer step, by hand ------------------------------------------------------------------
def test_integer_step_decay_threshold_saturation_by_hand():
    rule = TernaryRule(threshold=24, decay_shift=3, saturated_cap=20, scale_threshold=12)
    trits = torch.tensor([[0, 1, -1, 0, 1, 0, 0, 0]], dtype=torch.int8)
    t_acc = torch.tensor([[40, -10, 0, -23, 0, 0, 0, 0]], dtype=torch.int8)
    votes = torch.tensor([[20, -20, 30, -2, 100, 0, 0, 0]], dtype=torch.int32)
    exponent, e_acc = torch.tensor([5], dtype=torch.int8), torch.tensor([10], dtype=torch.int8)
    t, a, e, ea, stats = apply_votes(trits, t_acc, exponent, e_acc, votes, torch.tensor([5]), rule)
    # col 0: 40 - 40//8 = 35, +20 = 55 -> two thresholds, room for one: trit 1, acc 31, capped 20
    # col 1: -10 - (-1) = -9, -20 = -29 -> trit 1 -> 0, acc -5
    # col 2: 0 + 30 = 30 -> trit -1 -> 0, acc 6
    # col 3: -23 - (-2) = -21, -2 = -23 -> no crossing
    # col 4: +100 on a saturated +1 -> capped at 20
    assert t.tolist() == [[1, 0, 0, 0, 1, 0, 0, 0]]
    assert a.tolist() == [[20, -5, 6, -23, 20, 0, 0, 0]]
    assert stats["trit_flips"] == 3
    # scale: 10 - 1 = 9, +5 = 14 -> one exponent step, 2 left
    assert e.tolist() == [6] and ea.tolist() == [2] and stats["scale_moves"] == 1


def test_frozen_short_rows_learn_only_their_scale():
    rule = TernaryRule(threshold=4, freeze_short_rows=True, scale_threshold=2)
    trits = torch.ones(3, 1, dtype=torch.int8)
    t, a, e, ea, _ = apply_votes(trits, torch.zeros(3, 1, dtype=torch.int8), torch.zeros(3, dtype=torch.int8),
                                 torch.zeros(3, dtype=torch.int8), torch.full((3, 1), -50),
                                 torch.tensor([2, -2, 0]), rule)
    assert t.flatten().tolist() == [1, 1, 1] and a.abs().sum() == 0
    assert e.tolist() == [1, -1, 0]
    t2, *_ = apply_votes(trits, torch.zeros(3, 1, dtype=torch.int8), torch.zeros(3, dtype=torch.int8),
                         torch.zeros(3, dtype=torch.int8), torch.full((3, 1), -50), None,
                         TernaryRule(threshold=4))
    assert t2.flatten().tolist() == [-1, -1, -1]  # unfrozen, the same votes flip them


def test_update_rows_is_quantise_then_apply():
    torch.manual_seed(1)
    trits = torch.randint(-1, 2, (6, 20), dtype=torch.int8)
    t_acc = torch.randint(-20, 21, (6, 20), dtype=torch.int8)
    exp, e_acc = torch.randint(-40, 0, (6,), dtype=torch.int8), torch.randint(-5, 6, (6,), dtype=torch.int8)
    g = torch.randn(6, 20)
    a = update_rows(trits, t_acc, exp, e_acc, g, TUNED_RULE)
    b = apply_votes(trits, t_acc, exp, e_acc, quantize_evidence(g, TUNED_RULE),
                    scale_votes(g, trits, exp, TUNED_RULE), TUNED_RULE)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))


def test_rule_validation():
    for bad in (dict(rounding="up"), dict(max_vote=0), dict(saturated_cap=200), dict(scale_mode="x"),
                dict(threshold=128)):
        with pytest.raises(ValueError):
            TernaryRule(**bad)
    r = TUNED_RULE.scaled(0.5)
    assert r.evidence_rate == TUNED_RULE.evidence_rate / 2 and r.scale_rate == TUNED_RULE.scale_rate / 2


# -- integer votes: exact sums over micro-batches ---------------------------------------------
class _Net(TernaryUpdateMixin, nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = TernaryLinear(12, 16, generator=gen)
        self.norm = TernaryRMSNorm(16)
        self.b = TernaryLinear(16, 5, generator=gen)
        self.ternary_rule = TernaryRule(threshold=6, evidence_rate=4.0, rounding="stochastic",
                                        scale_mode="norm", scale_threshold=3, decay_shift=4)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def _micro_batches(n, seed=5, b=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 12, generator=g, dtype=dtype), torch.randint(0, 5, (b,), generator=g))
            for _ in range(n)]


def _loss(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def _run_accumulated(order, steps=3, per_step=2, dtype=torch.float32):
    """dp=1 reference: each step accumulates `per_step` micro-batches, each committed as votes."""
    net = _Net().to(dtype)
    mbs = _micro_batches(steps * per_step, dtype=dtype)
    states = []
    for s in range(steps):
        chunk = mbs[s * per_step:(s + 1) * per_step]
        for i in order(per_step):
            loss = _loss(net, *chunk[i])
            loss.backward()
            commit_micro_batch(net, net.ternary_rule, micro_batches=per_step)
        net.ternary_micro_batches = per_step
        assert net._ternary_update_memory(loss_signal=loss.item()) is True
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def test_votes_sum_exactly_in_any_micro_batch_order():
    fwd = _run_accumulated(lambda n: range(n))
    rev = _run_accumulated(lambda n: reversed(range(n)))
    again = _run_accumulated(lambda n: range(n))  # same seed, same run: bit-identical (determinism)
    for a, b, c in zip(fwd, rev, again):
        assert _same_state(a, b) and _same_state(a, c)
    first = _run_accumulated(lambda n: range(n), steps=1)[0]
    assert not _same_state(first, _Net().state_dict()), "the update changed nothing"


def test_votes_of_two_micro_batches_are_the_sum_of_each():
    mbs = _micro_batches(2)
    net = _Net()
    singles = []
    for x, y in mbs:
        _loss(net, x, y).backward()
        net.a.weight.commit_micro_batch(net.ternary_rule)
        singles.append(net.a.weight.votes()[1].clone())
        net.zero_grad()
        net.a.weight.clear_evidence()
        for _, m in ternary_matrices(net):
            m.clear_evidence()
    for x, y in mbs:
        _loss(net, x, y).backward()
        net.a.weight.commit_micro_batch(net.ternary_rule)
    assert torch.equal(net.a.weight.votes()[1], singles[0] + singles[1])
    # The design does NOT promise that votes of two micro-batches equal the votes of one batch
    # holding both (each micro-batch is normalised and rounded on its own); only the sum is exact.


def test_distinct_reduced_votes_are_not_merged_again_and_update_alike():
    """set_votes(distinct=True), as the data-parallel reduction calls it with torch.unique's ids,
    hands the votes over as they are; the update equals the merging path's; votes added after
    it are merged again."""
    from arbd.ternary.state import TernaryMatrix
    g = torch.Generator().manual_seed(11)
    base = TernaryMatrix(300, 64, generator=g)
    idx = torch.randperm(300, generator=g)[:120]          # distinct, unsorted
    v = torch.randint(-40, 41, (120, 64), generator=g, dtype=torch.int32)
    e = torch.randint(-20, 21, (120,), generator=g, dtype=torch.int32)
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    fast.set_votes(idx, v, e, distinct=True)
    got = fast.votes()
    assert got[0] is not None and torch.equal(got[0], idx) and torch.equal(got[1], v)
    slow.set_votes(idx, v, e)
    assert torch.equal(slow.votes()[0], idx.sort().values)   # the merging path sorts
    sf, ss = fast.apply_update(TUNED_RULE), slow.apply_update(TUNED_RULE)
    assert sf["trit_flips"] == ss["trit_flips"] > 0
    assert _same_state(fast.state_dict(), slow.state_dict())
    assert not _same_state(fast.state_dict(), base.state_dict())
    # a micro-batch's votes on top of distinct ones: the ids repeat, so votes() merges them
    fast.set_votes(idx, v, e, distinct=True)
    fast.add_committed(idx[:10], v[:10], e[:10])
    mid, mv, _ = fast.votes()
    assert mid.numel() == 120 and torch.equal(mv[torch.searchsorted(mid, idx[:10])], 2 * v[:10])


def test_a_commit_holding_several_micro_batches_votes_their_share():
    """An expert under expert parallelism takes k micro-batches' tokens in one backward
    (micro_batches_per_commit = k): its votes carry k shares of the step's rate, the same votes
    as a matrix committed with the rule scaled by k / micro_batches."""
    (x, y), = _micro_batches(1)
    votes = {}
    for k in (1, 2):
        net = _Net()
        net.a.weight.micro_batches_per_commit = k
        _loss(net, x, y).backward()
        commit_micro_batch(net, net.ternary_rule, micro_batches=4, rate_mult=0.5)
        votes[k] = (net.a.weight.votes()[1], net.b.weight.votes()[1])
    ref = _Net()
    _loss(ref, x, y).backward()
    ref.a.weight.commit_micro_batch(ref.ternary_rule.scaled(0.5 * 2 / 4))
    assert torch.equal(votes[2][0], ref.a.weight.votes()[1])
    assert torch.equal(votes[2][1], votes[1][1])     # the other matrix keeps its share
    assert votes[2][0].abs().sum() > 1.5 * votes[1][0].abs().sum()


def test_nonfinite_micro_batch_poisons_the_step():
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    (x, y), = _micro_batches(1)
    _loss(net, x, y).backward()
    net.a.weight._grad[0, 0] = float("nan")
    commit_micro_batch(net, net.ternary_rule, micro_batches=2)
    _loss(net, x, y).backward()
    assert net._ternary_update_memory(loss_signal=1.0) is False
    assert net.ternary_stats.skipped_nonfinite_grad == 1
    assert _same_state(before, net.state_dict())


# -- data parallel on gloo ---------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SparseNet(TernaryUpdateMixin, nn.Module):
    """A sparse embedding table (touched rows differ per micro-batch) and a dense head."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.emb = TernaryEmbeddingTable(40, 16, sparse=True, generator=gen)
        self.head = TernaryLinear(16, 5, generator=gen)
        self.ternary_rule = TernaryRule(threshold=3, evidence_rate=4.0, rounding="stochastic",
                                        scale_mode="norm", scale_threshold=2)

    def forward(self, ids):
        return self.head(self.emb(ids)).mean(1)


def _sparse_batches(n):
    g = torch.Generator().manual_seed(9)
    # micro-batch i touches rows [8 i % 40, 8 i % 40 + 12): overlapping, different per rank
    return [(torch.randint(8 * i % 40, 8 * i % 40 + 12, (3, 4), generator=g) % 40,
             torch.randint(0, 5, (3,), generator=g)) for i in range(n)]


def _dp_worker(rank, world, port, mode, encoding, dtype_name, out_dir, steps, nan_step):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from arbd.ternary.dp import DPEvidenceReducer
        if dtype_name == "sparse":
            net = _SparseNet()
            net.ternary_evidence_reducer = DPEvidenceReducer(mode=mode, encoding=encoding)
            net.ternary_micro_batches = world
            mbs, states = _sparse_batches(steps * world), []
            for s in range(steps):
                ids, y = mbs[s * world + rank]
                nn.functional.cross_entropy(net(ids), y).backward()
                assert net._ternary_update_memory(loss_signal=1.0)
                states.append({k: v.clone() for k, v in net.state_dict().items()})
            torch.save({"states": states}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        dtype = getattr(torch, dtype_name)
        net = _Net().to(dtype)
        if encoding == "packed":
            net.ternary_rule = TernaryRule(threshold=3, evidence_rate=0.8, rounding="stochastic",
                                           max_vote=1, scale_mode="norm", scale_threshold=2)
        red = DPEvidenceReducer(mode=mode, encoding=encoding, dtype=torch.float32)
        net.ternary_evidence_reducer = red
        net.ternary_micro_batches = world
        mbs = _micro_batches(steps * world, dtype=dtype)
        states, applied = [], []
        for s in range(steps):
            x, y = mbs[s * world + rank]
            loss = _loss(net, x, y)
            if s == nan_step and rank == 1:
                loss = loss * float("nan")
            loss.backward()
            applied.append(net._ternary_update_memory(loss_signal=loss))
            states.append({k: v.clone() for k, v in net.state_dict().items()})
        torch.save({"states": states, "applied": applied, "bytes": red.stats.bytes_per_weight_per_step},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(mode, encoding="int8", dtype="float32", steps=3, nan_step=-1):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dp_worker, args=(2, _free_port(), mode, encoding, dtype, d, steps, nan_step),
                 nprocs=2, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]


def _reference_float_sum(steps=3, dtype=torch.float32):
    """dp=1 accumulating both micro-batches in float (the summed path's reference)."""
    net = _Net().to(dtype)
    mbs = _micro_batches(steps * 2, dtype=dtype)
    states = []
    for s in range(steps):
        for i in range(2):
            _loss(net, *mbs[2 * s + i]).backward()
        net._ternary_update_memory(loss_signal=1.0)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def test_dp2_sign_votes_equal_dp1_accumulation_bit_for_bit():
    r0, r1 = _spawn("votes")
    ref = _run_accumulated(lambda n: range(n))
    for step, (a, b, c) in enumerate(zip(r0["states"], r1["states"], ref)):
        assert _same_state(a, b), f"ranks differ after step {step}"
        assert _same_state(a, c), f"dp=2 differs from dp=1 after step {step}"
    assert all(r0["applied"]) and all(r1["applied"])
    # int8 votes: 1 byte per weight plus one per row (its scale vote): (288 + 37) / 288
    assert r0["bytes"] == pytest.approx((288 + 37) / 288)


def test_dp2_sign_votes_on_a_sparse_table_equal_dp1_bit_for_bit():
    r0, r1 = _spawn("votes", dtype="sparse", steps=3)
    net, mbs, ref = _SparseNet(), _sparse_batches(6), []
    for s in range(3):
        for ids, y in mbs[2 * s:2 * s + 2]:
            nn.functional.cross_entropy(net(ids), y).backward()
            commit_micro_batch(net, net.ternary_rule, micro_batches=2)
        net._ternary_update_memory(loss_signal=1.0)
        ref.append({k: v.clone() for k, v in net.state_dict().items()})
    for a, b, c in zip(r0["states"], r1["states"], ref):
        assert _same_state(a, b) and _same_state(a, c)
    assert not _same_state(ref[0], _SparseNet().state_dict())


def test_dp2_summed_fp32_equals_dp1_float_accumulation_bit_for_bit():
    r0, r1 = _spawn("summed")
    ref = _reference_float_sum()
    for a, b, c in zip(r0["states"], r1["states"], ref):
        assert _same_state(a, b) and _same_state(a, c)
    assert r0["bytes"] == 4.0  # fp32 on the wire in this test (bf16 by default: 2)


def test_dp2_packed_ternary_votes_and_a_nan_on_one_rank():
    r0, r1 = _spawn("votes", encoding="packed", steps=3, nan_step=1)
    assert r0["applied"] == [True, False, True] and r1["applied"] == [True, False, True]
    for a, b in zip(r0["states"], r1["states"]):
        assert _same_state(a, b)
    assert _same_state(r0["states"][0], r0["states"][1])  # the skipped step changed nothing
    assert not _same_state(r0["states"][1], r0["states"][2])
    assert r0["bytes"] == pytest.approx(math.ceil((288 + 37) / 5) / 288)  # 5 votes per byte


# -- schedule and STE --------------------------------------------------------------------------
def test_warmup_cosine_schedule():
    assert warmup_cosine(5, 100, warmup=10) == 0.5
    assert warmup_cosine(10, 100, warmup=10) == 1.0
    assert math.isclose(warmup_cosine(55, 100, warmup=10, floor=0.1), 0.55)
    assert math.isclose(warmup_cosine(100, 100, warmup=10, floor=0.1), 0.1)
    with pytest.raises(ValueError):
        warmup_cosine(1, 0)


def test_absmean_ste_forward_is_ternary_and_gradient_passes_straight_through():
    w = torch.tensor([[0.9, -0.1, 0.3], [-1.2, 0.05, 0.6]], requires_grad=True)
    q = absmean_ternary(w)
    gamma = float(w.detach().abs().mean())
    assert torch.allclose(q, torch.tensor([[1, 0, 1], [-1, 0, 1]]) * gamma)
    (q * torch.arange(6.0).reshape(2, 3)).sum().backward()
    assert torch.equal(w.grad, torch.arange(6.0).reshape(2, 3))


# -- it learns -----------------------------------------------------------------------------------
def test_short_training_run_learns():
    from arbd.data import ByteBatches, ValWindows, load_corpus
    from arbd.model.byte_lm import ByteLM, ternary_layers
    from arbd.train.evaluate import bits_per_byte

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    corpus = load_corpus()
    model = ByteLM(64, 1, 2, 128, layers=ternary_layers(generator=torch.Generator().manual_seed(0)))
    model.ternary_rule = TUNED_RULE
    batches = ByteBatches(corpus.train, 64, 16, seed=0)
    val = ValWindows(corpus.val, 64, 32, max_windows=64)
    start = bits_per_byte(model, val)
    steps = 80
    for step in range(1, steps + 1):
        model.ternary_rate_mult = warmup_cosine(step, steps, warmup=5, floor=0.1)
        x, y = next(batches)
        loss = model.loss(x, y)
        loss.backward()
        assert model._ternary_update_memory(loss_signal=loss)
    end = bits_per_byte(model, val)
    # Measured (seeds 0, 1, 2): 4.03, 4.01, 4.06 bits/byte after 80 steps, from ~8.9 at init.
    # A byte-unigram model scores 5.19 on these windows, so < 4.4 needs context, not just counts.
    assert start > 7.5
    assert end < 4.4, f"held-out bits/byte {end:.3f} after {steps} steps"
    assert model.ternary_stats.applied == steps and model.ternary_stats.trit_flips > 0
    assert time.perf_counter() - t0 < 20
