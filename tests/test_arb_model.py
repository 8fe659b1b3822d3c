"""ARBModel on arb-tiny: assembly, flags, shapes, ledger, generation, counts, learning."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from arbd.config import SEED14_TARGETS, get_preset, logical_ternary_weights
from arbd.data import ByteBatches, load_corpus
from arbd.data.modalities import synthetic_batch
from arbd.model.arb import ARBModel, area_weights, check_training_backend
from arbd.ternary import TernaryRule, ternary_matrices

TINY = get_preset("arb-tiny")
# Flag sets the training entry points use (seed 19): text-lite, full text stack, everything.
TEXT_LITE = dict(use_vq=False, use_graph=False, use_moe=False, use_attention=False,
                 use_output_router=False, use_video_head=False, use_talker_head=False,
                 use_vision=False, use_audio=False)
FULL_TEXT = dict(use_output_router=False, use_video_head=False, use_talker_head=False,
                 use_vision=False, use_audio=False)


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("preset", ["arb-tiny", "arb-small", "arb-3b"])
def test_built_model_counts_equal_config_formula(preset):
    cfg = get_preset(preset)
    counts = area_weights(ARBModel(cfg, device="meta"))
    formula = logical_ternary_weights(cfg)
    assert {k: counts[k] for k in formula} == formula
    if preset == "arb-3b":
        for area, target in SEED14_TARGETS.items():
            assert abs(counts[area] - target) <= 0.05 * target, area


@pytest.mark.parametrize("flags", [TEXT_LITE, FULL_TEXT, {}], ids=["text-lite", "full-text", "all"])
def test_forward_backward_update_for_training_flag_sets(flags):
    cfg = TINY.with_overrides(**flags)
    model = ARBModel(cfg)
    built = {n for n, c in model.named_children() if c is not None}
    if flags is TEXT_LITE:
        assert built == {"sequencer", "memgram", "lti", "byte_head"}
    ids = torch.randint(0, 256, (2, 21))
    before = _snapshot(model)
    out = model(ids)
    assert out.byte_logits.shape == (2, 19, 3, 256)
    assert torch.isfinite(out.loss)
    if cfg.use_vq:
        assert out.motif_ids.shape == (2, 19)
        assert int(out.motif_ids.max()) < cfg.shared_vq_size
    assert model._ternary_update_memory(loss_signal=out.loss)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(m.has_evidence for _, m in ternary_matrices(model))


def test_every_stage_shape_and_hca_at_odd_lengths():
    cfg = TINY.with_overrides(kv_cache_len=16, hca_cache_len=4)  # T' = 29 > window, 29 % 4 != 0
    model = ARBModel(cfg)
    ids = torch.randint(0, 256, (2, 31))
    h = model.sequencer(ids)
    assert h.shape == (2, 29, cfg.d_model)
    assert model.memgram(ids, h).shape == h.shape and model.lti(h).shape == h.shape
    vq = model.shared_vq(h)
    assert vq.hidden.shape == h.shape and vq.ids.shape == (2, 29)
    assert model.layers[0](h).shape == h.shape
    out = model(ids)
    out.loss.backward()
    assert all(m.has_evidence for m in (l.wkv_b.weight for l in model.layers))
    model._ternary_update_memory(loss_signal=out.loss)


def test_ledger_after_training_step_and_generation():
    model = ARBModel(TINY)
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids)
    pred = out.byte_logits[:, :, 0].argmax(-1)
    # seeded with the 12 prompt bytes, then the 10 predictions appended
    assert torch.equal(model.ledger.view(), torch.cat([ids, pred], 1))
    prompt = torch.tensor([list(b"def f")])
    g = model.generate(prompt, 6, generator=torch.Generator().manual_seed(0))
    assert g.shape == (1, 11) and torch.equal(g[:, :5], prompt)
    assert torch.equal(model.ledger.view()[:, :5], prompt)  # seeded with the prompt
    again = model.generate(prompt, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g, again)


class _LargestAllocation(TorchDispatchMode):
    """Largest tensor any op creates (numel), over the ops run inside the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # In-place ops and views return (part of) an input: not a new allocation.
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_step_allocates_nothing_proportional_to_codebook_size():
    cfg = TINY.with_overrides(shared_vq_size=2_000_000, kgvq_size=1_000_000,
                              vq_exact_max=65_536, vq_candidates=16, use_vision=False,
                              use_audio=False, use_memgram=False)
    model = ARBModel(cfg)
    ids = torch.randint(0, 256, (2, 20))
    with _LargestAllocation() as mode:
        out = model(ids)
        model._ternary_update_memory(loss_signal=out.loss)
    # A full-table temporary would be >= 1M elements; a step's largest must stay far below.
    assert mode.largest < 200_000, mode.largest
    # and the check is live: a dense decode of the table is caught
    with _LargestAllocation() as mode:
        model.shared_vq.codebook.matrix.decode()
    assert mode.largest >= 2_000_000 * 64


def test_media_forwards_train():
    model = ARBModel(TINY)
    for kind, data in [("image", synthetic_batch("image", 0, range(2))),
                       ("video", synthetic_batch("video", 0, range(2), frames=3)),
                       ("audio", synthetic_batch("audio", 0, range(2)))]:
        out = model.forward_media(kind, data)
        assert torch.isfinite(out.loss) and kind in out.losses and "router" in out.losses
        assert model._ternary_update_memory(loss_components=out.losses)


def test_tilelang_training_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="ARB_TILELANG_TRAINING=1"):
        check_training_backend("tilelang")
    check_training_backend("torch")


def test_bad_input():
    model = ARBModel(TINY.with_overrides(**TEXT_LITE))
    with pytest.raises(ValueError, match="T >= 4"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs use_vision"):
        model.forward_media("image", torch.rand(1, 3, 8, 8))


def test_loss_falls_over_200_steps_on_embedded_corpus():
    torch.manual_seed(0)
    model = ARBModel(TINY.with_overrides(**FULL_TEXT))
    model.ternary_rule = TernaryRule()
    corpus = load_corpus()
    batches = ByteBatches(corpus.train, 32, 8, seed=0)
    losses = []
    for _ in range(200):
        x, y = next(batches)
        out = model(torch.cat([x, y[:, -1:]], 1))
        losses.append(out.losses["byte"].item())
        model._ternary_update_memory(loss_signal=out.loss)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 1.0, (first, last)


@pytest.mark.parametrize("head_chunk", [None, 16, 40])
def test_activation_checkpointing_changes_nothing_but_memory(head_chunk):
    """Recomputing MLA layers, MemGram, LTI, MoEGraph's scheduler and each ACT step, and the
    ByteHead in backward gives the same loss and the same ternary evidence, bit for bit (float64),
    on the full arb-tiny stack. With the ByteHead in chunks of 16 or 40 of the 76 positions its
    products run on fewer rows, so everything agrees to rounding instead."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    got, saved = [], []
    steps = []
    for ck in (False, True):
        model = ARBModel(TINY, seed=1)
        model.activation_checkpointing = ck
        if head_chunk:
            model.head_chunk_positions = head_chunk
        runs = [0]
        step = model.moegraph.act_step
        model.moegraph.act_step = lambda *a, step=step, runs=runs: (runs.__setitem__(0, runs[0] + 1), step(*a))[1]
        head_calls = []
        model.byte_head.register_forward_pre_hook(lambda m, i: head_calls.append(i[0].numel() // i[0].shape[-1]))
        n = [0]

        def pack(t, n=n):   # what autograd keeps for backward during the forward
            n[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, dtype=torch.float64)
        saved.append(n[0])
        forward_steps = runs[0]
        out.loss.backward()
        steps.append((forward_steps, runs[0]))
        # The head ran once per chunk in forward, and again per chunk in backward when recomputed.
        chunks = {None: [76], 16: [16, 16, 16, 16, 12], 40: [40, 36]}
        assert sorted(head_calls) == sorted(chunks[head_chunk] * 2 if ck else [76]), head_calls
        ev = {n: m.evidence() for n, m in ternary_matrices(model)}
        got.append((out.loss.detach(), ev))
    assert saved[1] < 0.7 * saved[0], saved   # the checkpointed blocks kept only their inputs
    # Each ACT step ran once more, in backward, under checkpointing; never without.
    assert steps[0][0] == steps[0][1] == steps[1][0] > 0 and steps[1][1] == 2 * steps[1][0], steps
    same = torch.equal if head_chunk is None else \
        lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert same(got[0][0], got[1][0])
    assert got[0][1].keys() == got[1][1].keys()
    compared = 0
    for name, (idx, g) in got[0][1].items():
        idx2, g2 = got[1][1][name]
        assert (g is None) == (g2 is None), name
        if g is not None:
            assert same(g, g2), name
            assert (idx is None and idx2 is None) or torch.equal(idx, idx2), name
            compared += 1
    assert compared > 20


def test_an_offloaded_region_recomputes_from_its_own_copy_of_the_inputs():
    """maybe_recompute(offload=True) runs the region through a closure over its inputs (on the
    CPU nothing moves): gradients equal the plain run's bit for bit, and the region runs twice."""
    from arbd.model.recompute import maybe_recompute
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    calls = []

    def region(a, scale):
        calls.append(a.shape)
        return torch.tanh(a @ w) * scale

    region(x, 2.0).square().sum().backward()
    want = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    calls.clear()
    maybe_recompute(True, region, x, 2.0, offload=True).square().sum().backward()
    assert len(calls) == 2
    assert torch.equal(x.grad, want[0]) and torch.equal(w.grad, want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_offload_changes_nothing_but_gpu_memory(monkeypatch, request):
    """Checkpointing with the recomputed regions' inputs in pinned host memory: the same loss and
    the same ternary evidence bit for bit (float32 on CUDA), and less left on the GPU between
    forward and backward."""
    from arbd.model import recompute
    monkeypatch.setattr(recompute, "OFFLOAD_MIN_BYTES", 0)   # arb-tiny's inputs are all small
    # CUDA's float index_add / scatter sum in any order unless told otherwise
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    request.addfinalizer(lambda: torch.use_deterministic_algorithms(was))
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3)).cuda()
    got, held, copies = [], [], []
    plain_offload = recompute.HostInputs.offload
    for offload in (False, True):
        model = ARBModel(TINY, seed=1, device="cuda")
        model.activation_checkpointing = True
        model.activation_offload = offload
        made = []
        monkeypatch.setattr(recompute.HostInputs, "offload", lambda self, made=made: (
            plain_offload(self), made.append(len(self.host)))[0])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = model(ids)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - base)
        copies.append(sum(made))
        out.loss.backward()
        got.append((out.loss.detach(), {n: m.evidence() for n, m in ternary_matrices(model)}))
    # 2 layers, MemGram, LTI, the head, the scheduler and the ACT steps: 8 regions, 1-2 inputs each
    assert copies[0] == 0 and copies[1] >= 8, copies
    assert held[1] < held[0], held
    assert torch.equal(got[0][0], got[1][0]), (got[0][0].item(), got[1][0].item())
    compared = 0
    for name, (idx, g) in got[0][1].items():
        idx2, g2 = got[1][1][name]
        assert (g is None) == (g2 is None), name
        if g is not None:
            assert torch.equal(g, g2), name
            compared += 1
    assert compared > 20
