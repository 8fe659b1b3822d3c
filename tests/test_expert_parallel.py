"""MoEGraph expert parallelism: ep = 2 and 4 equal one rank running the group's concatenated
tokens (the same routing), gloo on CPU, float64: outputs within 1e-10 and, after an update with
the tuned rule, every expert, router, halt gate and norm identical, bit for bit."""
import pytest
import torch

from arbd.config import get_preset
from arbd.model.moegraph import MoEGraph
from arbd.parallel.expert_parallel import is_expert_matrix, parallelize_moe
from arbd.parallel.launch_utils import run_on_ranks
from arbd.ternary import TernaryMatrix, grouped
from arbd.ternary.rule import TUNED_RULE

CFG = get_preset("arb-tiny").with_overrides(use_graph=False, act_max_steps=3)
ROWS = [7, 12, 0, 5]   # tokens per rank: uneven, and one rank with none


def _data(rank, dtype=torch.float64):
    g = torch.Generator().manual_seed(50 + rank)
    h = torch.randn(ROWS[rank], CFG.d_model, generator=g, dtype=dtype)
    return h, torch.randn(ROWS[rank], CFG.d_model, generator=g, dtype=dtype)


def _state(moe):
    return {n: (m.trits(), m.exponent.clone(), m.t_accum.clone(), m.e_accum.clone())
            for n, m in moe.named_modules() if isinstance(m, TernaryMatrix)}


def _step(moe, h, w, reduce_replicated):
    out, aux = moe.act(h)
    (out * w).sum().backward()
    moe.evidence_seen = {n: m.evidence()[1].clone() for n, m in moe.named_modules()
                         if isinstance(m, TernaryMatrix) and is_expert_matrix(n) and m.has_evidence}
    for name, m in moe.named_modules():
        if not isinstance(m, TernaryMatrix):
            continue
        if not is_expert_matrix(name):
            reduce_replicated(m)
        if m.has_evidence:
            m.apply_update(TUNED_RULE)
    return out.detach(), float(aux["ponder"])


def _worker(rank, world, dtype=torch.float64, grouped_experts="auto"):
    grouped.GROUPED_EXPERTS = grouped_experts
    moe = MoEGraph(CFG, generator=torch.Generator().manual_seed(7)).to(dtype)
    parallelize_moe(moe, torch.distributed.group.WORLD, world, rank)

    def reduce_replicated(m):   # replicated matrices: sum the ranks' evidence (data parallel)
        idx, g = m.evidence()
        g = torch.zeros(m.rows, m.cols, dtype=dtype) if g is None else g
        torch.distributed.all_reduce(g)
        m.set_evidence(None, g)

    out, _ = _step(moe, *_data(rank, dtype), reduce_replicated)
    return {"out": out, "state": _state(moe), "experts": sorted(moe.experts.keys()),
            "stats": dict(moe.dispatch.stats), "evidence": moe.evidence_seen}


@pytest.mark.parametrize("ep", [2, 4])
def test_ep_equals_one_rank(ep):
    ref = MoEGraph(CFG, generator=torch.Generator().manual_seed(7))
    parts = [_data(r) for r in range(ep)]
    out, _ = _step(ref, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                   lambda m: None)
    ref_state = _state(ref)
    res = run_on_ranks(_worker, ep)
    starts = [sum(ROWS[:r]) for r in range(ep + 1)]
    seen = set()
    for r, got in enumerate(res):
        torch.testing.assert_close(got["out"], out[starts[r]:starts[r + 1]], rtol=1e-10, atol=1e-10)
        assert len(got["experts"]) == CFG.n_experts // ep
        for name, parts_ in got["state"].items():
            for a, b in zip(parts_, ref_state[name]):
                assert torch.equal(a, b), f"rank {r}: {name} differs from one rank"
        seen.update(n for n in got["state"] if is_expert_matrix(n))
        assert got["stats"]["dispatches"] >= 1
    assert seen == {n for n in ref_state if is_expert_matrix(n)}   # every expert lives somewhere
    assert sum(g["stats"]["rows_sent"] for g in res) > 0               # tokens really moved


def test_ep_with_grouped_experts_equals_one_rank_grouped():
    """The grouped expert path (all local experts in two torch._grouped_mm calls) under ep = 2:
    each rank groups its own block of experts; float32 on CPU, same state as one rank."""
    if not grouped.grouped_mm_works(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm does not run float32 on this CPU build")
    old, grouped.GROUPED_EXPERTS = grouped.GROUPED_EXPERTS, "on"
    try:
        ref = MoEGraph(CFG, generator=torch.Generator().manual_seed(7)).to(torch.float32)
        parts = [_data(r, torch.float32) for r in range(2)]
        out, _ = _step(ref, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                       lambda m: None)
    finally:
        grouped.GROUPED_EXPERTS = old
    res = run_on_ranks(_worker, 2, torch.float32, "on")
    seen = set()
    for r, got in enumerate(res):
        torch.testing.assert_close(got["out"], out[sum(ROWS[:r]):sum(ROWS[:r + 1])], rtol=1e-5, atol=1e-6)
        # float32: the routers see other batch sizes, so compare the experts' evidence (the
        # update's input) within rounding rather than the rounded votes bit for bit.
        for name, ev in got["evidence"].items():
            torch.testing.assert_close(ev, ref.evidence_seen[name], rtol=1e-4, atol=1e-5)
            seen.add(name)
    assert seen == set(ref.evidence_seen) and len(seen) >= CFG.n_experts


def test_ep_refuses_a_size_that_does_not_divide_the_experts():
    moe = MoEGraph(CFG)
    with pytest.raises(ValueError, match="divide the 4 experts"):
        parallelize_moe(moe, None, 3, 0)


def _one_sided(rank, world):
    """Rank 0 has no tokens and receives none; rank 1 routes only to its own experts. Both must
    still run the reverse exchanges in backward (a skipped one deadlocks or mismatches)."""
    moe = MoEGraph(CFG, generator=torch.Generator().manual_seed(7))
    parallelize_moe(moe, torch.distributed.group.WORLD, world, rank)
    n = 0 if rank == 0 else 3
    x = torch.randn(n, CFG.d_model, dtype=torch.float64, requires_grad=True)
    top_i = torch.tensor([[3, 2]] * n, dtype=torch.long).reshape(n, 2)
    top_w = torch.full((n, 2), 0.5, dtype=torch.float64)
    for _ in range(2):   # a second round fails loudly if the first one's exchanges were skipped
        moe.dispatch(x, top_i, top_w).sum().backward()
    return {"grad": x.grad, "evidence": [moe.experts[k].up.weight.has_evidence for k in moe.experts]}


def test_ep_backward_with_a_rank_that_receives_nothing():
    res = run_on_ranks(_one_sided, 2)
    assert res[0]["evidence"] == [False, False] and res[1]["evidence"] == [True, True]
    assert res[1]["grad"].shape == (3, CFG.d_model) and bool(res[1]["grad"].abs().sum() > 0)
