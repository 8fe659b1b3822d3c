"""Row-sharded codebook vs the unsharded TernaryVQCodebook, on W gloo ranks (CPU).

Every multi-rank scenario runs in one spawn per world size; each rank builds the unsharded
reference itself (a few thousand rows, cheap) and compares its own block with the reference's
rows. The codebook group gets a 60 s timeout, so a rank that skipped a collective would fail
the test instead of hanging it.
"""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from arbd.parallel.launch_utils import run_on_ranks
from arbd.parallel.sharded_vq import (ShardedTernaryVQCodebook, shard_bounds, shard_range,
                                      verify_shard_states)
from arbd.ternary.rule import TernaryRule, TUNED_RULE
from arbd.vq import TernaryVQCodebook

ROWS, DIM, C = 3001, 64, 16
KW = dict(candidate_count=C, exact_max=64, hash_seed=0xC0DE)
# A fast rule (low thresholds) so that trits and scales move within three steps; stochastic
# rounding and 'norm' scale votes are the parts that are hardest to reproduce when sharded.
RULE = TernaryRule(threshold=2, evidence_rate=3.0, rounding="stochastic", scale_mode="norm",
                   scale_threshold=1, scale_rate=2.0, decay_shift=5)
UNEVEN = {1: None, 2: [1000, 2001], 3: None, 4: [700, 1, 1300, 1000]}   # 3: balanced 1000/1000/1001
BUFFERS = ("packed", "exponent", "t_accum", "e_accum")


def _group(world: int):
    return dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=60))


def _batches(step: int, world: int, ref: TernaryVQCodebook, empty_rank: int | None) -> list:
    """Each rank's batch: queries near random rows (any owner), random queries, a block shared
    by every rank (the same ids requested by several ranks) and in-batch duplicates."""
    shared_g = torch.Generator().manual_seed(777 + step)
    shared = ref.decode_rows(torch.randint(0, ROWS, (5,), generator=shared_g)) \
        + 0.2 * torch.randn(5, DIM, generator=shared_g)
    out = []
    for r in range(world):
        if r == empty_rank:
            out.append(torch.zeros(0, DIM))
            continue
        g = torch.Generator().manual_seed(1000 * step + r)
        near = ref.decode_rows(torch.randint(0, ROWS, (10 + 3 * r,), generator=g))
        near = near + 0.3 * torch.randn(near.shape, generator=g)
        x = torch.cat([near, torch.randn(6, DIM, generator=g), shared])
        out.append(torch.cat([x, x[:4]]))                   # duplicates inside the batch
    return out


def _same_rows(sh: ShardedTernaryVQCodebook, ref: TernaryVQCodebook) -> bool:
    a, b = sh.row_start, sh.row_stop
    return all(torch.equal(getattr(sh.matrix, k), getattr(ref.matrix, k)[a:b]) for k in BUFFERS) \
        and torch.equal(sh.usage, ref.usage[a:b])


def _scenario(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    grp = _group(world)
    res: dict = {"world": world}
    sizes = UNEVEN[world]
    mk = lambda **kw: ShardedTernaryVQCodebook(ROWS, DIM, group=grp, shard_sizes=sizes, **KW, **kw)
    ref = TernaryVQCodebook(ROWS, DIM, **KW)
    sh = mk()
    res["bounds"] = sh.bounds
    res["init_equal"] = _same_rows(sh, ref)

    # -- lookups: fetch, score, exact; async with out-of-order finish ------------------------
    xs = _batches(0, world, ref, None)
    off = sum(x.shape[0] for x in xs[:rank])
    mine = slice(off, off + xs[rank].shape[0])
    X = torch.cat(xs)
    want = ref.lookup(X)
    res["fetch_ids"] = torch.equal(sh.lookup(xs[rank]), want[mine])
    res["fetch_rows"] = sh.last_lookup["rows_fetched"]
    res["shared_ids_owned_elsewhere"] = int((sh.owner_of(want[mine]) != rank).sum())
    sh.strategy = "score"
    res["score_ids"] = torch.equal(sh.lookup(xs[rank]), want[mine])
    sh.strategy = "fetch"
    res["exact_ids"] = torch.equal(sh.lookup(xs[rank], mode="exact"),
                                   ref.lookup(X, mode="exact")[mine])
    ys = _batches(5, world, ref, None)
    h1 = sh.start_lookup(xs[rank])
    h2 = sh.start_lookup(ys[rank])
    busy = torch.randn(256, 256) @ torch.randn(256, 256)     # compute while replies travel
    ids2, ids1 = sh.finish(h2), sh.finish(h1)
    off_y = sum(y.shape[0] for y in ys[:rank])
    res["async"] = (torch.equal(ids1, want[mine]) and bool(torch.isfinite(busy).all()) and
                    torch.equal(ids2, ref.lookup(torch.cat(ys))[off_y:off_y + ys[rank].shape[0]]))
    rows = torch.tensor([0, ROWS - 1, 1500, 1500, rank])
    res["decode_rows"] = torch.equal(sh.decode_rows(rows), ref.decode_rows(rows))

    # -- 'concat': three steps vs one unsharded forward on the concatenated batch -------------
    ok, flips, zero_rank_loss = [], 0, None
    for step in range(3):
        empty = world - 1 if (step == 1 and world > 1) else None    # a rank with no queries
        fwds = 2 if step == 2 else 1                                # step 2: two micro-batches
        for f in range(fwds):
            xs = _batches(10 * step + f + 1, world, ref, empty)
            off = sum(x.shape[0] for x in xs[:rank])
            out = sh(xs[rank])
            ro = ref(torch.cat(xs))
            sl = slice(off, off + xs[rank].shape[0])
            ok.append(torch.equal(out.ids, ro.ids[sl]) and
                      torch.equal(out.quantized, ro.quantized[sl]))
            total = out.loss.detach().clone()
            dist.all_reduce(total, group=grp)
            ok.append(bool(torch.allclose(total, ro.loss.detach(), rtol=1e-5)))
            if rank == empty:
                zero_rank_loss = float(out.loss.detach())
            out.loss.backward()
            ro.loss.backward()
        sh.apply_update(RULE)
        flips += ref.apply_update(RULE)["trit_flips"]
        ok.append(_same_rows(sh, ref))
    res["concat_steps"] = ok
    res["concat_flips"] = flips
    res["zero_rank_loss"] = zero_rank_loss
    res["update_bytes"] = sh.comm.update_bytes
    res["lookup_bytes"] = sh.comm.lookup_bytes

    # -- 'concat' with integer votes: the owners quantise the global batch's evidence ---------
    res["concat_votes_steps"] = _concat_votes_run(rank, world, grp, sizes)
    # -- 'micro', integer votes: vs one codebook accumulating the ranks' batches -------------
    res["votes_steps"] = _micro_run(rank, world, grp, sizes, RULE, votes=True)
    # -- 'micro', float row sums, two forwards per rank ------------------------------------------
    res["micro_float_steps"] = _micro_run(rank, world, grp, sizes, RULE, votes=False)

    # -- checkpoint metadata --------------------------------------------------------------------
    sd = sh.state_dict()
    res["range"] = shard_range(sd)
    res["state"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sd.items()}
    twin = mk()
    twin.load_state_dict(sd)
    res["reload_equal"] = all(torch.equal(a, b) for a, b in zip(twin.buffers(), sh.buffers()))
    bad = dict(sd)
    bad["_extra_state"] = dict(sd["_extra_state"], row_start=sd["_extra_state"]["row_start"] + 1)
    try:
        twin.load_state_dict(bad)
        res["bad_range_error"] = None
    except ValueError as e:
        res["bad_range_error"] = str(e)
    return res


def _concat_votes_run(rank, world, grp, sizes) -> list:
    ref = TernaryVQCodebook(ROWS, DIM, **KW)
    sh = ShardedTernaryVQCodebook(ROWS, DIM, group=grp, shard_sizes=sizes, **KW)
    ok, flips = [], 0
    for step in range(2):
        for f in range(2):                     # two committed micro-batches per step
            xs = _batches(200 + 10 * step + f, world, ref, world - 1 if f else None)
            out, ro = sh(xs[rank]), ref(torch.cat(xs))
            out.loss.backward()
            ro.loss.backward()
            sh.commit_micro_batch(RULE.scaled(0.5))
            ref.matrix.commit_micro_batch(RULE.scaled(0.5))
        sh.apply_update(RULE)
        flips += ref.apply_update(RULE)["trit_flips"]
        ok.append(_same_rows(sh, ref))
    ok.append(flips > 0)
    return ok


def _micro_run(rank, world, grp, sizes, rule, *, votes: bool) -> list:
    ref = TernaryVQCodebook(ROWS, DIM, **KW)
    sh = ShardedTernaryVQCodebook(ROWS, DIM, group=grp, shard_sizes=sizes, semantics="micro", **KW)
    ok, flips = [], 0
    fwds = 1 if votes else 2
    for step in range(2):
        empty = 0 if (step == 1 and world > 1) else None
        for f in range(fwds):
            xs = _batches(100 + 10 * step + f, world, ref, empty)
            out = sh(xs[rank])
            out.loss.backward()
            if votes:
                sh.commit_micro_batch(rule.scaled(1 / world))
            # The reference: rank-major micro-batches, each its own forward.
            for r in range(world):
                ro = ref(xs[r])
                ro.loss.backward()
                if votes:
                    ref.matrix.commit_micro_batch(rule.scaled(1 / world))
                if r == rank:
                    ok.append(torch.equal(out.ids, ro.ids) and torch.equal(out.loss, ro.loss))
        sh.apply_update(rule)
        flips += ref.apply_update(rule)["trit_flips"]
        ok.append(_same_rows(sh, ref))
    ok.append(flips > 0)
    return ok


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_equals_unsharded(world):
    t0 = time.time()
    results = run_on_ranks(_scenario, world)
    for r, res in enumerate(results):
        assert res["init_equal"], f"rank {r}: initial rows differ from the unsharded table"
        assert res["fetch_ids"] and res["score_ids"] and res["exact_ids"], (r, res)
        assert res["async"] and res["decode_rows"], (r, res)
        assert all(res["concat_steps"]), (r, res["concat_steps"])
        assert res["concat_flips"] > 0            # the rule really moved trits
        assert all(res["concat_votes_steps"]), (r, res["concat_votes_steps"])
        assert all(res["votes_steps"]), (r, res["votes_steps"])
        assert all(res["micro_float_steps"]), (r, res["micro_float_steps"])
        assert res["reload_equal"]
        assert "checkpoint shard holds rows" in res["bad_range_error"]
    bounds = shard_bounds(ROWS, world, UNEVEN[world])
    assert [res["range"] for res in results] == [(bounds[r], bounds[r + 1], ROWS)
                                                 for r in range(world)]
    assert verify_shard_states([res["state"] for res in results]) == bounds
    if world > 1:
        assert results[-1]["zero_rank_loss"] == 0.0
        # Rows owned elsewhere were really fetched, and bytes were counted.
        assert all(res["shared_ids_owned_elsewhere"] > 0 for res in results)
        assert all(res["lookup_bytes"] > 0 and res["update_bytes"] > 0 for res in results)
        with pytest.raises(ValueError, match="expected a non-empty block starting at"):
            verify_shard_states([results[1]["state"], results[0]["state"]])
    else:
        assert results[0]["lookup_bytes"] == 0      # W = 1: nothing leaves the rank
    assert time.time() - t0 < 60


# -- bad input: a clear error on every rank, and no rank left waiting --------------------------

def _catch(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _bad_inputs(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    grp = _group(world)
    res = {}
    cc = 8 if rank == 2 else C
    res["config"] = _catch(lambda: ShardedTernaryVQCodebook(
        ROWS, DIM, group=grp, candidate_count=cc, exact_max=64, hash_seed=0xC0DE))
    res["too_many_ranks"] = _catch(lambda: ShardedTernaryVQCodebook(2, DIM, group=grp,
                                                                    candidate_count=1))
    res["bad_sizes"] = _catch(lambda: ShardedTernaryVQCodebook(ROWS, DIM, group=grp,
                                                               shard_sizes=[1, 2, 3], **KW))
    sh = ShardedTernaryVQCodebook(ROWS, DIM, group=grp, **KW)
    ref = TernaryVQCodebook(ROWS, DIM, **KW)
    before = [b.clone() for b in sh.buffers()]
    ids = torch.tensor([0, 5, ROWS if rank == 1 else 7])
    res["ids_out_of_range"] = _catch(lambda: sh.decode_rows(ids))
    res["negative_ids"] = _catch(lambda: sh.fetch_rows(torch.tensor([-1 if rank == 0 else 0])))
    x = torch.randn(6, DIM)
    if rank == 0:
        x[1, 2] = float("nan")
    res["nan"] = _catch(lambda: sh(x))
    res["shape"] = _catch(lambda: sh.lookup(torch.randn(3, DIM if rank != 2 else DIM - 1)))
    res["mode"] = _catch(lambda: sh.lookup(torch.randn(3, DIM), mode="exact" if rank else "auto"))
    res["out_of_step"] = _catch(lambda: sh.lookup(torch.randn(2, DIM)) if rank == 0
                                else sh.apply_update(RULE))
    res["rules_differ"] = _catch(lambda: sh.apply_update(RULE if rank else TUNED_RULE))
    res["tensor_norm"] = _catch(lambda: sh.apply_update(TernaryRule(norm="tensor")))
    res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, sh.buffers()))
    # The group is still in step: a good lookup and update work afterwards.
    y = torch.randn(5, DIM, generator=torch.Generator().manual_seed(rank))
    ys = [torch.randn(5, DIM, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    res["after"] = torch.equal(sh.lookup(y), ref.lookup(torch.cat(ys))[5 * rank:5 * rank + 5])
    sh.apply_update(RULE)
    return res


def test_bad_input_errors_on_every_rank():
    results = run_on_ranks(_bad_inputs, 3)
    for r, res in enumerate(results):
        assert "config differs" in res["config"] and "candidate_count" in res["config"], res
        assert "cannot shard 2 rows over 3 ranks" in res["too_many_ranks"], res
        assert "shard_sizes must be 3 ints" in res["bad_sizes"], res
        want = "row ids must be in [0, 3001)" if r == 1 else "rank 1: it asked for row ids outside"
        assert want in res["ids_out_of_range"], res
        assert ("row ids must be in" if r == 0 else "rank 0") in res["negative_ids"], res
        assert ("NaN or inf" if r == 0 else "rank 0: its input was rejected") in res["nan"], res
        assert ("last dimension 64" if r == 2 else "rank 2") in res["shape"], res
        assert "different lookup paths" in res["mode"], res
        assert res["out_of_step"].startswith("RuntimeError") and "out of step" in res["out_of_step"]
        assert "different update rules" in res["rules_differ"], res
        assert "per-row evidence normalisation" in res["tensor_norm"], res
        assert res["unchanged"] and res["after"], res


def test_shard_bounds_and_single_process():
    assert shard_bounds(10, 3) == [0, 3, 6, 10]
    assert shard_bounds(10, 3, [1, 1, 8]) == [0, 1, 2, 10]
    with pytest.raises(ValueError, match="cannot shard 2 rows over 3 ranks"):
        shard_bounds(2, 3)
    # Without a process group the codebook is a W = 1 twin of the unsharded one.
    sh = ShardedTernaryVQCodebook(500, DIM, candidate_count=8, exact_max=0)
    ref = TernaryVQCodebook(500, DIM, candidate_count=8, exact_max=0)
    x = torch.randn(40, DIM, generator=torch.Generator().manual_seed(3))
    out, ro = sh(x), ref(x)
    assert torch.equal(out.ids, ro.ids) and torch.equal(out.loss, ro.loss)
    out.loss.backward()
    ro.loss.backward()
    sh.apply_update(TUNED_RULE)
    ref.apply_update(TUNED_RULE)
    assert _same_rows(sh, ref)
    assert sh.state_bytes() == ref.state_bytes() and sh.comm.lookup_bytes == 0
