"""MLA tensor parallelism: tp = 2 and 4 equal tp = 1 (gloo, CPU).

float64: outputs within 1e-10 and, after three training steps of the tuned rule (stochastic
rounding, "norm" scale votes), every trit, exponent and accumulator identical. float32: outputs
within float32 tolerance. Both the window-only path and the HCA path (sequence longer than the
window) are exercised, and generation with the latent cache.
"""
import pytest
import torch

from arbd.config import get_preset
from arbd.model.mla import MLA
from arbd.parallel.launch_utils import run_on_ranks
from arbd.parallel.tensor_parallel import parallelize_mla, shard_matrix
from arbd.ternary import TernaryMatrix, packing
from arbd.ternary.rule import TUNED_RULE

CFG = get_preset("arb-tiny").with_overrides(kv_cache_len=8, hca_cache_len=3)
STEPS = [(2, 6), (2, 19), (1, 11)]   # (batch, seq): window only, then HCA blocks


def _inputs(step, dtype):
    b, t = STEPS[step]
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(b, t, CFG.d_model, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(b, t, CFG.d_model, generator=g, dtype=torch.float64).to(dtype)
    return x, w


def _full_state(layer):
    """name -> (trits, exponent, t_accum, e_accum) of the whole matrices; tp shards gathered."""
    out = {}
    for name, m in layer.named_modules():
        if not isinstance(m, TernaryMatrix):
            continue
        parts = [m.trits(), m.exponent.clone(), m.t_accum.clone(), m.e_accum.clone()]
        sh = m.tp_shard
        if sh is not None and sh.group is not None:
            world = torch.distributed.get_world_size(sh.group)
            for i in (0, 2) if sh.dim == 1 else (0, 1, 2, 3):
                pieces = [torch.empty_like(parts[i]) for _ in range(world)]
                torch.distributed.all_gather(pieces, parts[i].contiguous(), group=sh.group)
                parts[i] = torch.cat(pieces, dim=sh.dim if parts[i].dim() > 1 else 0)
        out[name] = tuple(parts)
    return out


def _train(layer, dtype, rule):
    outs = []
    for step in range(len(STEPS)):
        x, w = _inputs(step, dtype)
        y = layer(x)
        outs.append(y.detach())
        (y * w).sum().backward()
        for m in layer.modules():
            if isinstance(m, TernaryMatrix) and m.has_evidence:
                m.apply_update(rule)
    # Generation with the latent ring cache continues the trained layer.
    cache = layer.new_cache(1, dtype=dtype)
    x, _ = _inputs(1, dtype)
    with torch.no_grad():
        gen = torch.cat([layer(x[:1, i:i + 1], cache) for i in range(x.shape[1])], 1)
    return outs, gen


def _run(rank, world, dtype, rule):
    layer = MLA(CFG, generator=torch.Generator().manual_seed(3))
    if world > 1:
        parallelize_mla(layer, torch.distributed.group.WORLD, world, rank)
    outs, gen = _train(layer, dtype, rule)
    return {"outs": outs, "gen": gen, "state": _full_state(layer),
            "local_rows": layer.wq_b.weight.rows, "local_cols": layer.wo.weight.cols}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_single_rank_float64(tp):
    ref = _run(0, 1, torch.float64, TUNED_RULE)
    res = run_on_ranks(_run, tp, torch.float64, TUNED_RULE)
    heads = CFG.n_heads // tp
    for r in res:
        assert r["local_rows"] == heads * (CFG.qk_nope_dim + CFG.qk_rope_dim)
        assert r["local_cols"] == heads * CFG.v_head_dim
        for a, b in zip(r["outs"], ref["outs"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert r["state"].keys() == ref["state"].keys()
        for name, parts in ref["state"].items():
            for i, (a, b) in enumerate(zip(r["state"][name], parts)):
                assert torch.equal(a, b), f"{name} part {i} differs from tp = 1"
        torch.testing.assert_close(r["gen"], ref["gen"], rtol=1e-10, atol=1e-10)
    init = _full_state(MLA(CFG, generator=torch.Generator().manual_seed(3)))
    moved = sum(int((ref["state"][n][0] != init[n][0]).sum()) for n in init)
    assert moved > 0   # the three steps really changed trits


def test_tp_equals_single_rank_float32():
    ref = _run(0, 1, torch.float32, TUNED_RULE)
    res = run_on_ranks(_run, 2, torch.float32, TUNED_RULE)
    for r in res:
        # The first step runs on identical weights: outputs agree to float32 rounding.
        torch.testing.assert_close(r["outs"][0], ref["outs"][0], rtol=1e-5, atol=1e-5)


def test_shard_matrix_slices_and_refuses_bad_input():
    m = TernaryMatrix(6, 13, generator=torch.Generator().manual_seed(0))
    whole = m.trits().clone()
    shard_matrix(m, 1, 5, 11, None)
    assert torch.equal(m.trits(), whole[:, 5:11]) and m.packed.shape == (6, packing.packed_cols(6))
    assert m.tp_shard.offset == 5 and m.tp_shard.global_size == 13
    with pytest.raises(RuntimeError, match="whole"):
        shard_matrix(m, 0, 0, 2, None)
    with pytest.raises(ValueError, match="outside"):
        shard_matrix(TernaryMatrix(4, 4), 0, 2, 9, None)
    layer = MLA(CFG)
    with pytest.raises(ValueError, match="divide the 4 heads"):
        parallelize_mla(layer, None, 3, 0)


def _tp_zero(rank, world):
    """tp 2 x dp 2 (ranks 2d + t): MLA shards whose accumulators are ZeRO-partitioned over dp,
    float64 evidence summed over dp, then one tuned-rule update per step."""
    from arbd.ternary.zero import ZeroPartitioner
    from arbd.ternary.update import UpdateStats, apply_ternary_update

    dist = torch.distributed
    groups = {"tp": [dist.new_group([0, 1]), dist.new_group([2, 3])],
              "dp": [dist.new_group([0, 2]), dist.new_group([1, 3])]}
    d, t = divmod(rank, 2)
    layer = MLA(CFG, generator=torch.Generator().manual_seed(3))
    parallelize_mla(layer, groups["tp"][d], 2, t)
    zp = ZeroPartitioner(layer, groups["dp"][t], "summed", dtype=torch.float64)
    assert all(p.matrix.is_partitioned for p in zp.parts if p.matrix.tp_shard is not None)
    stats = UpdateStats()
    for step in range(2):
        x, w = _inputs(step, torch.float64)      # batch 2: one sequence per dp rank
        (layer(x[d:d + 1]) * w[d:d + 1]).sum().backward()
        apply_ternary_update(layer, TUNED_RULE, stats, reduce_evidence=zp)
    sd = zp.gather_full_state()
    out = {}
    for name, m in layer.named_modules():
        if isinstance(m, TernaryMatrix):
            pre = f"{name}." if name else ""
            parts = [packing.unpack_trits(sd[pre + "packed"], m.cols), sd[pre + "exponent"],
                     sd[pre + "t_accum"], sd[pre + "e_accum"]]
            sh = m.tp_shard
            if sh is not None:
                for i in (0, 2) if sh.dim == 1 else (0, 1, 2, 3):
                    pieces = [torch.empty_like(parts[i]) for _ in range(2)]
                    dist.all_gather(pieces, parts[i].contiguous(), group=sh.group)
                    parts[i] = torch.cat(pieces, dim=sh.dim if parts[i].dim() > 1 else 0)
            out[name] = parts
    return out


def test_tp2_dp2_with_zero_partitioned_shards_equals_one_rank():
    layer = MLA(CFG, generator=torch.Generator().manual_seed(3))
    for step in range(2):
        x, w = _inputs(step, torch.float64)
        (layer(x) * w).sum().backward()
        for m in layer.modules():
            if isinstance(m, TernaryMatrix) and m.has_evidence:
                m.apply_update(TUNED_RULE)
    ref = {n: [m.trits(), m.exponent, m.t_accum, m.e_accum]
           for n, m in layer.named_modules() if isinstance(m, TernaryMatrix)}
    for r, got in enumerate(run_on_ranks(_tp_zero, 4)):
        for name, parts in ref.items():
            for i, (a, b) in enumerate(zip(got[name], parts)):
                assert torch.equal(a, b), f"rank {r}: {name} part {i} differs from one rank"


def _tp_zero_paths(rank, world):
    """tp 2 x dp 2, float32: the same two updates through the torch rule and through the GPU
    kernels (interpreted here), from the same state and evidence. Returns each path's gathered
    state and what the kernel path handed to the fused update."""
    from arbd.ternary import state, triton_update
    from arbd.ternary.update import UpdateStats, apply_ternary_update
    from arbd.ternary.zero import ZeroPartitioner

    dist = torch.distributed
    groups = {"tp": [dist.new_group([0, 1]), dist.new_group([2, 3])],
              "dp": [dist.new_group([0, 2]), dist.new_group([1, 3])]}
    d, t = divmod(rank, 2)
    seen = []
    original = triton_update.dense_update_many

    def recording(items, *a, **k):
        seen.extend((it.row_len is not None, it.row_offset, it.col_offset) for it in items)
        return original(items, *a, **k)

    out = {}
    for path in ("torch", "triton"):
        state.DENSE_UPDATE_KERNEL = state.ROW_UPDATE_KERNEL = path
        triton_update.dense_update_many = recording
        layer = MLA(CFG, generator=torch.Generator().manual_seed(3))
        parallelize_mla(layer, groups["tp"][d], 2, t)
        g = torch.Generator().manual_seed(10 + rank)   # accumulators near their thresholds
        for m in layer.modules():
            if isinstance(m, TernaryMatrix):
                m.t_accum.copy_(torch.randint(-23, 24, tuple(m.t_accum.shape), generator=g,
                                              dtype=torch.int8))
        zp = ZeroPartitioner(layer, groups["dp"][t], "summed", dtype=torch.float32)
        stats = UpdateStats()
        for step in range(2):
            x, w = _inputs(step, torch.float32)
            (layer(x[d:d + 1]) * w[d:d + 1]).sum().backward()
            apply_ternary_update(layer, TUNED_RULE, stats, reduce_evidence=zp)
        out[path] = (zp.gather_full_state(), stats.trit_flips, stats.scale_moves)
        triton_update.dense_update_many = original
    state.DENSE_UPDATE_KERNEL = state.ROW_UPDATE_KERNEL = "auto"
    out["seen"] = seen
    return out


def test_tp_shards_in_zero_blocks_through_the_kernels_equal_the_torch_rule():
    """Row shards (wq_b, wkv_b: global row offsets, the tp-summed scale mean) and column shards
    (wo: the hash placed in the whole row, row norms and dL/dE completed over the tp group) of
    ZeRO blocks through the fused update: every byte as the torch rule leaves it."""
    for r, got in enumerate(run_on_ranks(_tp_zero_paths, 4)):
        ref, new = got["torch"], got["triton"]
        assert ref[1] > 0 and ref[1:] == new[1:], f"rank {r}: counts {ref[1:]} vs {new[1:]}"
        differ = [k for k in ref[0] if not torch.equal(ref[0][k], new[0][k])]
        assert not differ, f"rank {r}: {differ}"
        col_shards = [s for s in got["seen"] if s[0]]
        wo_offset = (r % 2) * (CFG.n_heads // 2) * CFG.v_head_dim   # tp index t holds heads t
        assert col_shards and all(off == wo_offset for _, _, off in col_shards), got["seen"]
        if r:   # rank 0 holds the first dp block of the first tp shard: offsets 0
            assert any(not s[0] and s[1] > 0 for s in got["seen"]), got["seen"]


def _tp_paths(rank, world):
    """tp 2, float32, no ZeRO: two updates of every matrix through update.apply_updates, once with
    the torch rule and once with the kernels (interpreted), from the same state and evidence."""
    from arbd.ternary import state
    from arbd.ternary.update import apply_updates, ternary_matrices

    out = {}
    for path in ("torch", "triton"):
        state.DENSE_UPDATE_KERNEL = state.ROW_UPDATE_KERNEL = path
        layer = MLA(CFG, generator=torch.Generator().manual_seed(3))
        parallelize_mla(layer, torch.distributed.group.WORLD, world, rank)
        g = torch.Generator().manual_seed(20 + rank)
        for m in layer.modules():
            if isinstance(m, TernaryMatrix):
                m.t_accum.copy_(torch.randint(-23, 24, tuple(m.t_accum.shape), generator=g,
                                              dtype=torch.int8))
        counts = []
        for step in range(2):
            x, w = _inputs(step, torch.float32)
            (layer(x) * w).sum().backward()
            items = [m.fused_tp_item(TUNED_RULE) for _, m in ternary_matrices(layer)
                     if m.tp_shard is not None] if path == "triton" and step == 0 else None
            if items is not None:   # fused_tp_item is collective and side-effect free: probe it
                out["tp_items"] = [(it.row_len, it.row_offset, it.col_offset) for it in items]
            counts.append(apply_updates(ternary_matrices(layer), TUNED_RULE))
        out[path] = ({k: v.clone() for k, v in layer.state_dict().items()}, counts)
    state.DENSE_UPDATE_KERNEL = state.ROW_UPDATE_KERNEL = "auto"
    return out


def test_tp_shards_through_the_kernels_equal_the_torch_rule_without_zero():
    for r, got in enumerate(run_on_ranks(_tp_paths, 2)):
        (ref, ref_counts), (new, new_counts) = got["torch"], got["triton"]
        assert ref_counts == new_counts and ref_counts[0]["trit_flips"] > 0, (ref_counts, new_counts)
        differ = [k for k in ref if not torch.equal(ref[k], new[k])]
        assert not differ, f"rank {r}: {differ}"
        items = got["tp_items"]
        assert len(items) == 3 and all(it is not None for it in items)
        assert sorted(row_len is not None for row_len, _, _ in items) == [False, False, True]
