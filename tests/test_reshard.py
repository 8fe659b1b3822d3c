"""Resharding: a checkpoint written at one layout loads at another, bit for bit.

The reference is one unsharded arb-tiny state with every accumulator, exponent and trit
randomised. Each layout slices it the way the parallel code does: MLA tensor parallelism through
the real `parallelize_attention` (wq_b / wkv_b rows, wo columns), ZeRO row blocks through the real
`TernaryMatrix.partition_rows`, expert parallelism by dropping the experts a rank does not own,
and the shared codebook row-sharded over the world (arbd/parallel/sharded_vq.py's blocks).
Round trip W=4 (tp2 ep2 dp2) -> W=2 (ep2 dp2) -> W=3 (dp3) -> W=1, each rank loading its own
pieces from the previous layout's files; then the CLI (`arbd-reshard`, `--export`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from arbd.config import get_preset
from arbd.model.arb import ARBModel
from arbd.model.kg_edges import encode_slots
from arbd.parallel.launch_utils import run_on_ranks
from arbd.parallel.tensor_parallel import parallelize_attention
from arbd.ternary import packing
from arbd.ternary.state import TernaryMatrix
from arbd.ternary.zero import row_blocks
from arbd.train import checkpoint as ck
from arbd.train import reshard
from arbd.train.reshard import Placement, placements_for

CB = "shared_vq.codebook."
META = {"preset": "arb-tiny", "world": 1}


def _model() -> ARBModel:
    return ARBModel(get_preset("arb-tiny"), backend="torch", seed=0)


@pytest.fixture(scope="module")
def full() -> dict[str, torch.Tensor]:
    """The unsharded reference state, every integer buffer randomised (zeros hide slicing bugs)."""
    g = torch.Generator().manual_seed(7)
    m = _model()
    sd = m.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(".packed"):
            cols = dict(m.named_modules())[k.rsplit(".", 1)[0]].cols
            trits = torch.randint(-1, 2, (v.shape[0], cols), generator=g, dtype=torch.int8)
            out[k] = packing.pack_trits(trits)
        elif k == "kg_edges.slots":   # valid slots: neighbour ids of the graph, counts 1..255
            ids = torch.randint(-1, m.kg_edges.num_targets, v.shape, generator=g)
            counts = torch.randint(1, 256, v.shape, generator=g)
            out[k] = encode_slots(ids, counts, v.dtype)
        elif v.dtype in (torch.int8, torch.int16, torch.int32):
            info = torch.iinfo(v.dtype)
            out[k] = torch.randint(max(info.min, -1000), min(info.max, 1000), v.shape, generator=g,
                                   dtype=v.dtype)
        else:
            out[k] = v.clone()
    return out


def _layout_state(full: dict[str, torch.Tensor], tp: int, ep: int, dp: int, rank: int
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Placement]]:
    """What rank `rank` of a tp x dp world (ep inside dp) holds, and its placements."""
    world = tp * dp
    dpi, tpi = divmod(rank, tp)
    m = _model()
    m.load_state_dict(full)
    if tp > 1:
        parallelize_attention(m.layers, None, tp, tpi)
    n_exp = m.cfg.n_experts
    mine = range((dpi % ep) * n_exp // ep, (dpi % ep + 1) * n_exp // ep)
    for name, mat in m.named_modules():
        if not isinstance(mat, TernaryMatrix) or name.startswith(CB[:-1]) or mat.cols < 2:
            continue
        # ZeRO: experts over their expert-dp group (dp / ep ranks), the rest over dp
        n, i = (dp // ep, dpi // ep) if ".experts." in name else (dp, dpi)
        mat.partition_rows(*row_blocks(mat.rows, n)[i])
    state = m.state_dict()
    places = placements_for(m, state)
    # Experts this rank does not own are not held at all (names are global indices).
    for k in [k for k in state if ".experts." in k and int(k.split(".experts.")[1].split(".")[0]) not in mine]:
        del state[k], places[k]
    # The shared codebook: contiguous row blocks over the whole world.
    a, b = row_blocks(state[CB + "usage"].shape[0], world)[rank]
    for k in [k for k in state if k.startswith(CB)]:
        state[k] = state[k][a:b].clone()
        pl = places[k]
        places[k] = Placement(pl.global_shape, (a, *pl.offsets[1:]), (b - a, *pl.lengths[1:]), pl.packed)
    return state, places


LAYOUTS = [(2, 2, 2), (1, 2, 2), (1, 1, 3), (1, 1, 1)]  # (tp, ep, dp): W = 4, 2, 3, 1


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_placements_describe_tp_and_zero_slices(full):
    state, places = _layout_state(full, 2, 2, 2, 3)  # dp index 1, tp index 1
    wo = places["layers.0.wo.weight.packed"]  # row-parallel: columns [32, 64), rows whole
    assert wo == Placement((64, 64), (0, 32), (64, 32), packed=True)
    assert state["layers.0.wo.weight.packed"].shape == (64, 7)  # 32 trits repacked on their own
    assert places["layers.0.wo.weight.exponent"] == Placement((64,), (0,), (64,))
    assert places["layers.0.wo.weight.t_accum"] == Placement((64, 64), (32, 32), (32, 32))
    wq = places["layers.0.wq_b.weight.t_accum"]  # column-parallel rows [48, 96), ZeRO half of them
    assert wq == Placement((96, 32), (72, 0), (24, 32))
    assert places["moegraph.experts.3.up.weight.t_accum"].global_shape == (128, 64)
    assert not any(".experts.0." in k for k in state)


def test_round_trip_across_layouts(full, tmp_path):
    """W=4 tp2 ep2 -> W=2 ep2 -> W=3 -> W=1: every rank's pieces and the final state bit-identical."""
    prev = None
    for n, (tp, ep, dp) in enumerate(LAYOUTS):
        world = tp * dp
        ranks = []
        for r in range(world):
            want, places = _layout_state(full, tp, ep, dp, r)
            if prev is not None:  # each rank of this layout loads its own pieces from the last one
                ckpt, index = prev
                got = ck.load_model_state(ckpt, index, places)
                _same(got, want)
            ranks.append({"state": want, "placements": places})
        out = ck.write_offline(tmp_path / f"layout{n}", 10 + n, ranks, float_state={}, meta=META)
        index = ck.read_index(out)
        ck.verify_files(out, index)
        files = sorted(p.name for p in out.glob("model-rank*.safetensors"))
        assert len(files) == world, files  # every rank wrote its own shard file
        prev = (out, index)
    _, _, whole = ck.read_whole(prev[0])
    _same(whole, full)


def test_outputs_identical_after_round_trip(full, tmp_path):
    ranks = [dict(zip(("state", "placements"), _layout_state(full, 2, 2, 2, r))) for r in range(4)]
    out = ck.write_offline(tmp_path / "w4", 3, ranks, float_state={}, meta=META)
    _, _, whole = ck.read_whole(out)
    a, b = _model(), _model()
    a.load_state_dict(full)
    b.load_state_dict(whole)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).byte_logits, b(ids).byte_logits)


def test_cli_reshard_and_export(full, tmp_path):
    ranks = [dict(zip(("state", "placements"), _layout_state(full, 1, 2, 2, r))) for r in range(2)]
    src = ck.write_offline(tmp_path / "src", 5, ranks, float_state={"logit_scale.step": torch.tensor(5.0)},
                           meta=META)
    assert reshard.main([str(src), str(tmp_path / "w3"), "--world", "3"]) == 0
    ckpt, index, whole = ck.read_whole(tmp_path / "w3")
    _same(whole, full)
    assert ckpt.name == "step-00000005" and len(list(ckpt.glob("model-rank*"))) == 3
    assert (ckpt / ck.OPTIM_FILE).is_file()
    # export: one file, whole tensors, no accumulators; the model built from it answers the same
    exp = tmp_path / "export" / "arb-tiny.safetensors"
    assert reshard.main([str(tmp_path / "w3"), str(exp), "--export"]) == 0
    with safe_open(str(exp), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert meta["preset"] == "arb-tiny" and meta["step"] == "5"
        tensors = {k: f.get_tensor(k) for k in keys}
    assert not any(k.endswith((".t_accum", ".e_accum")) for k in keys)
    assert {k for k in full if not k.endswith((".t_accum", ".e_accum"))} == keys
    a, b = _model(), _model()
    a.load_state_dict(full)
    missing = b.load_state_dict(tensors, strict=False).missing_keys
    assert missing and all(k.endswith(("t_accum", "e_accum")) for k in missing)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(a(ids).byte_logits, b(ids).byte_logits)


def test_bad_inputs_named(full, tmp_path, capsys):
    ranks = [dict(zip(("state", "placements"), _layout_state(full, 1, 1, 2, r))) for r in range(2)]
    src = ck.write_offline(tmp_path / "src", 1, ranks, float_state={}, meta=META)
    shard = src / ck.model_file(1)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    assert reshard.main([str(src), str(tmp_path / "dst"), "--world", "1"]) == 2
    assert f"{shard}: sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not (tmp_path / "x.safetensors").exists()
    # A shard missing from the index: the pieces no longer tile the tensor.
    index = json.loads((src / ck.INDEX).read_text())
    t = index["tensors"]["layers.0.wo.weight.t_accum"]
    t["pieces"] = t["pieces"][:1]
    (src / ck.INDEX).write_text(json.dumps(index))
    with pytest.raises(ck.CheckpointError, match=r"index\.json: layers\.0\.wo\.weight\.t_accum: "
                                                 r"pieces cover 2048 of 4096"):
        ck.read_index(src)
    # A model of another shape (another preset / plan): named, before anything is read.
    good = ck.write_offline(tmp_path / "good", 1, ranks, float_state={}, meta=META)
    index = ck.read_index(good)
    other = {"layers.0.wo.weight.packed": Placement((64, 128), (0, 0), (64, 128), packed=True)}
    with pytest.raises(ck.CheckpointError, match=r"index\.json: layers\.0\.wo\.weight\.packed is "
                                                 r"\(64, 64\) .* the model has \(64, 128\)"):
        ck.load_model_state(good, index, other)


# -- the real multi-process save: per-rank files, no gather ------------------------------------
def _save_on_ranks(rank: int, world: int, root: str, full: dict) -> dict:
    state, places = _layout_state(full, 1, 2, 2, rank)
    w = ck.CheckpointWriter(async_save=True)
    w.save(root, 7, model_state=state, placements=places, float_state={}, meta={**META, "world": 2},
           rank_meta={"rng": rank}, runtime_state={"ledger.ids": torch.full((2,), rank)})
    state["layers.0.wo.weight.exponent"].add_(1)  # training goes on: the save must not see this
    w.wait()
    torch.distributed.barrier()
    ckpt = Path(root) / ck.step_dir_name(7)
    index = ck.read_index(ckpt)
    got = ck.load_model_state(ckpt, index, places)
    state["layers.0.wo.weight.exponent"].sub_(1)
    return {"equal": all(torch.equal(got[k], state[k]) for k in state), "index": index}


def test_distributed_async_save_writes_per_rank_shards(full, tmp_path):
    res = run_on_ranks(_save_on_ranks, 2, str(tmp_path), full)
    assert all(r["equal"] for r in res)
    index = res[0]["index"]
    assert index["rng"] == [0, 1] and index["writers"] == 2
    files = {p["file"] for e in index["tensors"].values() for p in e["pieces"]}
    assert files == {ck.model_file(0), ck.model_file(1)}
    # replicated tensors come from rank 0 only; each rank's accumulator rows from that rank
    assert [p["file"] for p in index["tensors"]["layers.0.wo.weight.packed"]["pieces"]] == [ck.model_file(0)]
    assert len(index["tensors"]["layers.0.wo.weight.t_accum"]["pieces"]) == 2
    ckpt = tmp_path / ck.step_dir_name(7)
    _, _, whole = ck.read_whole(ckpt)
    _same(whole, full)
    for r in range(2):
        assert torch.equal(ck.runtime_for(ckpt, index, r, 2)["ledger.ids"], torch.full((2,), r))
