"""MoEGraph's grouped expert path (arbd/ternary/grouped.py) against the per-expert loop of
ternary linear layers: the same outputs, input gradients and weight evidence (CPU, float32 and
float64 through torch._grouped_mm's reference; on the GPU, bf16 through the Triton backend)."""
import copy

import pytest
import torch

from arbd.config import get_preset
from arbd.model.moegraph import MoEGraph
from arbd.ternary import grouped
from arbd.ternary.state import TernaryMatrix

CFG = get_preset("arb-tiny")


def _run(moe: MoEGraph, h: torch.Tensor, mode: str):
    """act() forward and backward with the grouped path `mode`: output, dL/dh, evidence."""
    old = grouped.GROUPED_EXPERTS
    grouped.GROUPED_EXPERTS = mode
    try:
        h = h.clone().requires_grad_(True)
        out, aux = moe.act(h)
        (out.square().sum() + aux["balance"]).backward()
    finally:
        grouped.GROUPED_EXPERTS = old
    ev = {n: m.evidence()[1] for n, m in moe.named_modules()
          if isinstance(m, TernaryMatrix) and ".experts." in f".{n}"}
    return out.detach(), h.grad, ev


def _pair(dtype, device="cpu", backend="torch"):
    torch.manual_seed(0)
    moe = MoEGraph(CFG, backend=backend, generator=torch.Generator().manual_seed(2)).to(device)
    h = torch.randn(37, CFG.d_model, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    return moe, copy.deepcopy(moe), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_experts_equal_the_expert_loop(dtype):
    if not grouped.grouped_mm_works(torch.device("cpu"), dtype):
        pytest.skip(f"torch._grouped_mm does not run {dtype} on this CPU build")
    a, b, h = _pair(dtype)
    out_g, gh_g, ev_g = _run(a, h, "on")
    out_l, gh_l, ev_l = _run(b, h, "off")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_g, out_l, **tol)
    torch.testing.assert_close(gh_g, gh_l, **tol)
    assert ev_g.keys() == ev_l.keys() and len(ev_g) == 2 * CFG.n_experts
    for n in ev_l:   # experts that got no rows have no evidence on either path
        assert (ev_g[n] is None) == (ev_l[n] is None), n
        if ev_l[n] is not None:
            torch.testing.assert_close(ev_g[n], ev_l[n], **tol)
    assert sum(e is not None for e in ev_g.values()) > CFG.n_experts


def test_stacked_weights_are_decoded_once_while_held_and_again_after_an_update():
    moe = MoEGraph(CFG, generator=torch.Generator().manual_seed(2))
    ups = [moe.experts[str(e)].up.weight for e in range(CFG.n_experts)]
    w = grouped.stacked_decoded(ups, torch.float32, "torch")
    for i, m in enumerate(ups):
        assert torch.equal(w[i], m.decode(torch.float32))
    assert grouped.stacked_decoded(ups, torch.float32, "torch") is w   # alive: shared
    ups[1].exponent.add_(1)                                            # changed: decoded again
    w2 = grouped.stacked_decoded(ups, torch.float32, "torch")
    assert w2 is not w and torch.equal(w2[1], ups[1].decode(torch.float32))


def test_grouped_ffn_refuses_counts_that_do_not_cover_the_rows():
    moe = MoEGraph(CFG, generator=torch.Generator().manual_seed(2))
    ex = [moe.experts[str(e)] for e in range(CFG.n_experts)]
    with pytest.raises(ValueError, match="counts summing to 3"):
        grouped.grouped_relu2_ffn(torch.zeros(5, CFG.d_model), [1, 2] + [0] * (CFG.n_experts - 2),
                                  [e.up.weight for e in ex], [e.down.weight for e in ex], "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_experts_on_gpu_match_the_loop_in_bf16():
    dev = torch.device("cuda")
    assert grouped.grouped_mm_works(dev, torch.bfloat16)
    a, b, h = _pair(torch.bfloat16, dev, "triton")
    out_g, gh_g, ev_g = _run(a, h, "auto")   # auto takes the grouped path here
    out_l, gh_l, ev_l = _run(b, h, "off")
    rel = lambda x, y: float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30))  # noqa: E731
    assert rel(out_g, out_l) < 2e-2 and rel(gh_g, gh_l) < 2e-2
    for n in ev_l:
        assert (ev_g[n] is None) == (ev_l[n] is None), n
        if ev_l[n] is not None:
            assert rel(ev_g[n], ev_l[n]) < 3e-2, n
