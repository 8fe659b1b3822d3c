"""bf16 evidence (a plan's `evidence_dtype: bf16`): accumulated in bf16, read by the rule exactly
as the fp32 value of the same bf16 sum, on the torch path and in the fused Triton update
(TRITON_INTERPRET=1 on CPU; GPU-marked run on a CUDA machine)."""
import copy
from dataclasses import replace

import pytest
import torch

from arbd.config import get_preset
from arbd.model.arb import ARBModel
from arbd.parallel import planner
from arbd.parallel.plan import load_plan
from arbd.ternary import ops, state
from arbd.ternary.rule import TUNED_RULE, TernaryRule
from arbd.ternary.state import TernaryMatrix, set_evidence_dtype
from arbd.ternary.update import apply_ternary_update

RULES = [TUNED_RULE, TernaryRule(rounding="stochastic", threshold=6),
         TernaryRule(norm="tensor", threshold=4, evidence_rate=7.5)]


def _products(n: int, rows: int, cols: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(17, rows, generator=g).to(dtype), torch.randn(17, cols, generator=g).to(dtype))
            for _ in range(n)]


def test_bf16_accumulation_rounds_once_per_product():
    """Each micro-batch's product is summed in fp32 and rounded once as it is added: equal to
    that recipe step by step, and within bf16 rounding of the float64 sum."""
    acc, want = None, None
    exact = torch.zeros(6, 9, dtype=torch.float64)
    for gy, x in _products(4, 6, 9, seed=1):
        acc = ops.weight_grad_into(acc, gy, x, dtype=torch.bfloat16)
        p = gy.t() @ x
        want = p.to(torch.bfloat16) if want is None else (want.float() + p).to(torch.bfloat16)
        exact += gy.double().t() @ x.double()
        assert acc.dtype == torch.bfloat16 and torch.equal(acc, want)
    assert torch.allclose(acc.double(), exact, rtol=2e-2, atol=2e-2 * exact.abs().mean().item())
    # float64 runs keep float64 whatever the matrix asks for
    gy, x = _products(1, 6, 9, seed=2, dtype=torch.float64)[0]
    assert ops.weight_grad_into(None, gy, x, dtype=torch.bfloat16).dtype == torch.float64


@pytest.mark.parametrize("kernel", ["off", pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("rule", RULES, ids=["tuned", "stochastic_row", "tensor_norm"])
@pytest.mark.parametrize("shape", [(37, 64), (19, 41), (5, 203)])
def test_update_from_bf16_evidence_equals_fp32_of_the_same_sum(shape, rule, kernel, monkeypatch):
    """Three steps of two micro-batches each: a bf16-evidence matrix (fused Triton update or the
    torch rule) ends byte for byte where the torch rule takes the fp32 copy of its evidence."""
    device, dtype = "cpu", torch.float32
    if kernel == "triton":
        tu = pytest.importorskip("arbd.ternary.triton_update")
        if type(tu._group_update_kernel).__name__ != "InterpretedFunction":
            if not torch.cuda.is_available():
                pytest.skip("no CUDA and no Triton interpreter")
            device, dtype = "cuda", torch.bfloat16   # cuBLAS adds the bf16 products in place
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows + cols)
    base = TernaryMatrix(rows, cols, generator=gen)
    base.t_accum.copy_(torch.randint(-127, 128, base.t_accum.shape, generator=gen).to(torch.int8))
    half, ref = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device)
    half.evidence_dtype = torch.bfloat16
    for step in range(3):
        r = replace(rule, salt=rule.salt + 1000 * step)
        for gy, x in _products(2, rows, cols, seed=10 * step + rows, dtype=dtype):
            half.add_grad_product(gy.to(device), x.to(device), "triton" if device == "cuda" else "torch")
        _, g = half.evidence()
        assert g.dtype == torch.bfloat16
        ref.add_grad(g.float())
        monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", kernel)
        got = half.apply_update(r)
        monkeypatch.setattr(state, "DENSE_UPDATE_KERNEL", "off")
        want = ref.apply_update(r)
        assert (got["trit_flips"], got["scale_moves"]) == (want["trit_flips"], want["scale_moves"])
        for name in ("packed", "t_accum", "exponent", "e_accum"):
            assert torch.equal(getattr(half, name), getattr(ref, name)), (step, name)
    assert not torch.equal(half.t_accum.cpu(), base.t_accum)


def test_model_holds_bf16_evidence_and_updates():
    """arb-tiny with set_evidence_dtype("bf16"): the linear layers' evidence (gy^T x) is bf16,
    while norm gains and the embedding table (added whole by add_grad) stay fp32; the update
    applies; a bad name is refused."""
    torch.manual_seed(0)
    cfg = get_preset("arb-tiny")
    models = {d: ARBModel(cfg, seed=0) for d in ("fp32", "bf16")}
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    dtypes = {}
    for name, m in models.items():
        set_evidence_dtype(m, name)
        m.ternary_rule = TUNED_RULE
        m(ids).loss.backward()
        dtypes[name] = {n: mod._grad.dtype for n, mod in m.named_modules()
                        if isinstance(mod, TernaryMatrix) and mod._grad is not None}
        assert apply_ternary_update(m, m.ternary_rule, m.ternary_stats, losses=[1.0])
    assert set(dtypes["fp32"].values()) == {torch.float32}
    assert dtypes["bf16"].keys() == dtypes["fp32"].keys()
    for n, d in dtypes["bf16"].items():
        whole = n.endswith((".gain", ".embed.weight"))   # gains, embedding tables
        assert d == (torch.float32 if whole else torch.bfloat16), n
    assert "layers.0.wq_a.weight" in dtypes["bf16"]
    with pytest.raises(ValueError, match="evidence_dtype must be one of"):
        set_evidence_dtype(models["fp32"], "fp16")


def test_plan_field_and_planner(tmp_path):
    text = ("name: t\npreset: arb-tiny\nlayout: {dp: 1, tp: 1, ep: 1, codebook_shards: 0}\n"
            "micro_batch: 2\ngrad_accum: 4\nseq_len: 32\n")
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text + "evidence_dtype: bf16\n")
    (tmp_path / "c.yaml").write_text(text + "evidence_dtype: fp16\n")
    a, b = load_plan(tmp_path / "a.yaml"), load_plan(tmp_path / "b.yaml")
    assert (a.evidence_dtype, b.evidence_dtype) == ("fp32", "bf16")
    with pytest.raises(ValueError, match=r"evidence_dtype must be one of \('fp32', 'bf16'\)"):
        load_plan(tmp_path / "c.yaml")
    ea, eb = planner.estimate(a), planner.estimate(b)
    fa = next(v for k, v in ea.rows.items() if k.startswith("float evidence (fp32"))
    fb = next(v for k, v in eb.rows.items() if k.startswith("float evidence (bf16"))
    assert fb < fa and eb.peak < ea.peak
