import random

import pytest
import torch

from arbd.config import get_preset
from arbd.model.kg_edges import KGEdges
from arbd.model.ledger import ContextAttentionScheduler, KVLedger
from arbd.model.moegraph import MoEGraph
from arbd.model.sequencer import Sequencer
from arbd.ternary import TernaryMatrix

CFG = get_preset("arb-tiny")


def test_sequencer_matches_float64_reference():
    seq = Sequencer(CFG, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 256, (2, 9))
    out = seq(ids, torch.float64)
    assert out.shape == (2, 7, CFG.d_model)
    emb = seq.embed.weight.decode(torch.float64)
    proj = seq.project.weight.decode(torch.float64)
    for b in range(2):
        for i in range(7):
            gram = torch.cat([emb[ids[b, i + j]] for j in range(3)])
            assert torch.allclose(out[b, i], proj @ gram, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="T >= 3"):
        seq(torch.zeros(2, 2, dtype=torch.long))


def _reference_observe(dst, weight, src_ids, dst_ids, cap):
    """Loop version of KGEdges.observe's documented rule; returns how many row halvings it made."""
    counts = {}
    for s, d in zip(src_ids, dst_ids):
        if s != d:
            counts[(s, d)] = counts.get((s, d), 0) + 1
    new = []
    for (s, d), c in sorted(counts.items()):
        if d in dst[s]:
            k = dst[s].index(d)
            weight[s][k] += c
        else:
            new.append((s, d, c))
    by_row = {}
    for s, d, c in new:
        by_row.setdefault(s, []).append((d, c))
    for s, items in by_row.items():
        keys = [(-1 if dst[s][k] < 0 else weight[s][k], k) for k in range(cap)]
        order = [k for _, k in sorted(keys)]
        for r, (d, c) in enumerate(items):
            if r >= cap:
                break
            k = order[r]
            if keys[k][0] <= c:
                dst[s][k], weight[s][k] = d, c
    aged = 0
    for s in {s for s, _ in counts}:   # aging: halve the row until its counts fit 8 bits
        while max(weight[s]) > 255:
            weight[s] = [max(w // 2, 1) if dst[s][k] >= 0 else 0 for k, w in enumerate(weight[s])]
            aged += 1
    return aged


@pytest.mark.parametrize("num_targets", [None, (1 << 24) + 9])
def test_kg_edges_match_loop_reference_and_touch_only_sources(num_targets):
    """Random pairs (few heavy ones, so rows age past 8-bit counts) against the loop rule; with
    num_targets above 2**24 the slots are int64 and the neighbour ids sit near the top."""
    n, cap = 40, 3
    edges = KGEdges(n, cap, num_targets=num_targets)
    base = 0 if num_targets is None else num_targets - 12     # neighbour ids base..base+11
    assert edges.slots.dtype == (torch.int32 if num_targets is None else torch.int64)
    dst = [[-1] * cap for _ in range(n)]
    weight = [[0] * cap for _ in range(n)]
    rng = random.Random(0)
    halvings = 0
    for step in range(30):
        src_ids = [rng.randrange(12) for _ in range(25)]
        dst_ids = [base + rng.randrange(12) for _ in range(25)]
        if step % 7 == 3:   # one pair seen hundreds of times in a step
            src_ids += [5] * 300
            dst_ids += [base + 6] * 300
        before = edges.slots.clone()
        touched = edges.observe(torch.tensor(src_ids), torch.tensor(dst_ids))
        assert touched == len({s for s, d in zip(src_ids, dst_ids) if s != d})
        halvings += _reference_observe(dst, weight, src_ids, dst_ids, cap)
        ids, counts = edges.table()
        assert ids.tolist() == dst and counts.tolist() == weight
        changed = (edges.slots != before).any(1).nonzero().flatten()
        assert set(changed.tolist()) <= set(src_ids)
    assert halvings >= 4 and min(w for row in weight for w in row if w) >= 1
    assert (edges.table()[0][12:] == -1).all()
    nbr, w = edges.neighbors(torch.tensor([5, 0]))
    assert nbr.tolist() == [dst[5], dst[0]] and w.dtype == torch.int16 and w.tolist() == [weight[5], weight[0]]
    limit = n if num_targets is None else num_targets
    with pytest.raises(ValueError, match=rf"\[0, {limit}\)"):
        edges.observe(torch.tensor([1]), torch.tensor([limit]))


def test_kg_slot_ids_use_the_whole_narrow_range():
    """Ids up to 2**24 - 1 wrap into int32's sign bit and decode back unchanged."""
    from arbd.model.kg_edges import decode_slots, encode_slots
    ids = torch.tensor([[0, (1 << 23) - 1, 1 << 23, (1 << 24) - 1, -1]])
    counts = torch.tensor([[1, 255, 7, 128, 0]])
    slots = encode_slots(ids, counts, torch.int32)
    assert slots.dtype == torch.int32 and (slots[0, 2:4] < 0).all()
    back = decode_slots(slots)
    assert back[0].tolist() == ids.tolist() and back[1].tolist() == counts.tolist()


def test_kg_edges_load_the_old_two_array_checkpoint():
    """A state dict with `dst` int32 and `weight` int16 (before packed slots) loads; counts
    above 255 are aged per row, so their ratios survive."""
    edges = KGEdges(4, 3)
    dst = torch.tensor([[1, 2, -1], [-1, -1, -1], [0, 3, 1], [2, -1, -1]], dtype=torch.int32)
    weight = torch.tensor([[3, 9, 0], [0, 0, 0], [1000, 250, 3], [32767, 0, 0]], dtype=torch.int16)
    edges.load_state_dict({"dst": dst, "weight": weight})
    ids, counts = edges.table()
    assert ids.tolist() == dst.tolist()
    assert counts.tolist() == [[3, 9, 0], [0, 0, 0], [250, 62, 1], [255, 0, 0]]
    with pytest.raises(RuntimeError, match="slots"):
        KGEdges(4, 3).load_state_dict({"dst": dst})
    bad = edges.state_dict()
    bad["slots"][2, 1] = (9 << 8) | 5          # neighbour 9 in a 4-node graph
    with pytest.raises(RuntimeError, match="neighbour id 9 is not below the graph's 4 nodes"):
        KGEdges(4, 3).load_state_dict(bad)


def test_ledger_seeds_once_and_wraps():
    led = KVLedger(4)
    assert led.view() is None
    led.seed(torch.tensor([[1, 2, 3]]))
    led.seed(torch.tensor([[9, 9, 9]]))  # not empty: ignored
    assert led.view().tolist() == [[1, 2, 3]]
    led.append(torch.tensor([[4, 5, 6]]))
    assert led.view().tolist() == [[3, 4, 5, 6]]


def test_scheduler_is_attention_over_ledger_embeddings():
    sched = ContextAttentionScheduler(8, generator=torch.Generator().manual_seed(1))
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    ids = torch.randint(0, 256, (2, 6))
    out = sched(h, ids)
    kv = sched.embed.weight.decode(torch.float64)[ids]
    att = torch.softmax(h @ kv.transpose(1, 2) / 8 ** 0.5, -1)
    assert torch.allclose(out, att @ kv)
    assert torch.equal(sched(h, None), torch.zeros_like(h))


def _attention_reference(q, kv):
    att = torch.softmax(q @ kv.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
    return att @ kv


@pytest.mark.parametrize("chunk", [1 << 23, 7 * 6, 5 * 6 * 2])   # one chunk; one row; two rows, ragged
def test_ledger_attention_matches_float64_softmax_and_its_gradients(monkeypatch, chunk):
    from arbd.model import ledger
    monkeypatch.setattr(ledger, "ATTENTION_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 7, 16, dtype=torch.float64, generator=g) * 2
    kv = torch.randn(5, 6, 16, dtype=torch.float64, generator=g)
    up = torch.randn(5, 7, 16, dtype=torch.float64, generator=g)
    qa, kva = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out = ledger.ledger_attention(qa, kva)
    (out * up).sum().backward()
    qr, kvr = q.clone().requires_grad_(), kv.clone().requires_grad_()
    ref = _attention_reference(qr, kvr)
    (ref * up).sum().backward()
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(qa.grad, qr.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(kva.grad, kvr.grad, rtol=1e-10, atol=1e-12)
    # 16-bit inputs: within bf16 rounding of the float64 answer, gradients included.
    qb, kvb = q.bfloat16().requires_grad_(), kv.bfloat16().requires_grad_()
    outb = ledger.ledger_attention(qb, kvb)
    (outb.double() * up).sum().backward()
    for got, want in ((outb, ref), (qb.grad, qr.grad), (kvb.grad, kvr.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ledger_attention_on_cuda_is_as_close_to_float64_as_sdpa(monkeypatch):
    """bf16 on the GPU, several chunks with a ragged last one: output and gradients are no
    further from the float64 answer than SDPA's own bf16 kernel is (plus a little)."""
    import torch.nn.functional as F
    from arbd.model import ledger
    monkeypatch.setattr(ledger, "ATTENTION_CHUNK_ELEMENTS", 2 * 300 * 500)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 300, 512, dtype=torch.float64, generator=g) * 2
    kv = torch.randn(5, 500, 512, dtype=torch.float64, generator=g)
    up = torch.randn(5, 300, 512, dtype=torch.float64, generator=g)
    qr, kvr = q.clone().requires_grad_(), kv.clone().requires_grad_()
    ref = _attention_reference(qr, kvr)
    (ref * up).sum().backward()
    errors = {}
    for name in ("ours", "sdpa"):
        qb = q.cuda().bfloat16().requires_grad_()
        kvb = kv.cuda().bfloat16().requires_grad_()
        if name == "ours":
            out = ledger.ledger_attention(qb, kvb)
        else:
            out = F.scaled_dot_product_attention(qb[:, None], kvb[:, None], kvb[:, None])[:, 0]
        (out.double() * up.cuda()).sum().backward()
        errors[name] = [float((got.double().cpu() - want).abs().max() / want.abs().max())
                        for got, want in ((out, ref), (qb.grad, qr.grad), (kvb.grad, kvr.grad))]
    for ours, sdpa in zip(errors["ours"], errors["sdpa"]):
        assert ours < max(1.5 * sdpa, 1e-2), errors


def test_ledger_attention_refuses_mismatched_shapes():
    from arbd.model.ledger import ledger_attention
    with pytest.raises(ValueError, match=r"q \[B, T, d\] and kv \[B, L, d\]"):
        ledger_attention(torch.randn(2, 3, 4), torch.randn(3, 5, 4))


def _moegraph():
    torch.manual_seed(0)
    return MoEGraph(CFG, generator=torch.Generator().manual_seed(2))


def test_dispatch_equals_dense_mixture():
    m = _moegraph()
    x = torch.randn(7, CFG.d_model, dtype=torch.float64)
    top_i, top_w, _ = m.route(x)
    got = m.dispatch(x, top_i, top_w)
    want = torch.stack([sum(top_w[r, k] * m.experts[str(int(top_i[r, k]))](x[r:r + 1])[0]
                            for k in range(m.top_k)) for r in range(7)])
    assert torch.allclose(got, want)


def test_act_contributions_sum_to_one_and_respect_cap():
    m = _moegraph()
    h = torch.randn(11, CFG.d_model, dtype=torch.float64)
    out, aux = m.act(h)
    assert out.shape == h.shape and torch.isfinite(out).all()
    assert 1 <= float(aux["ponder"]) <= CFG.act_max_steps
    # With every halt probability forced to 0, each position runs to the cap and takes the
    # last state whole (remainder 1).
    m.halt.weight.set_trits(torch.zeros(1, CFG.d_model, dtype=torch.int8))
    m.halt.weight.exponent.fill_(-128)
    out, aux = m.act(h)
    assert float(aux["ponder"]) == CFG.act_max_steps


def test_graph_message_reads_only_active_rows_as_constants():
    m = _moegraph()
    codebook = TernaryMatrix(CFG.shared_vq_size, CFG.codebook_dim)
    edges = KGEdges(CFG.shared_vq_size, CFG.kg_edges_per_node)
    ids = torch.tensor([[5, 9, 5, 300]])
    edges.observe(ids[:, :-1], ids[:, 1:])
    msg = m.graph_message(ids, codebook, edges, torch.float64)
    rows = codebook.decode(torch.float64)
    # motif 5 has neighbours 9 and 300 (weight 1 each); its aggregate is their mean with its own row
    want5 = m.node_proj(((rows[5] + rows[9] + rows[300]) / 3)[None])[0]
    assert torch.allclose(msg[0, 0], want5) and torch.allclose(msg[0, 2], want5)
    msg.sum().backward()
    # The graph reads codebook rows as constants (the codebook learns from its own loss), so
    # the same code serves a row-sharded codebook; the projection learns.
    assert not codebook.has_evidence and m.node_proj.weight.has_evidence


def test_only_moegraph_layers_round_their_rows_for_cublas():
    """MoEGraph's ternary layers see a different row count at every call (ACT steps, experts,
    graph nodes) and pad it to a repeating size; the trunk's layers (fixed rows) do not pay the
    copy. ARBModel.forward's MLA layers are the example of the latter."""
    from arbd.model.mla import MLA
    from arbd.ternary import TernaryLinear
    m = _moegraph()
    inside = [mod for mod in m.modules() if isinstance(mod, TernaryLinear)]
    assert inside and all(mod.varying_rows for mod in inside)
    mla = MLA(CFG, layer_idx=0)
    assert not any(mod.varying_rows for mod in mla.modules() if isinstance(mod, TernaryLinear))
