"""Where each saved tensor piece sits in the whole tensor, and re-cutting pieces for another layout.

A rank's state_dict under tensor / expert / ZeRO / codebook parallelism holds pieces of the
model's tensors. `Placement` says which piece: the box [offsets, offsets + lengths) of a tensor
whose whole (logical) shape is `global_shape`. Packed trit matrices are described in trits, not
bytes: their stored rows are base-3 packed on their own (arbd/ternary/packing.py), so a column
piece of a packed matrix is re-cut by unpacking, slicing and repacking.

`placements_for(model)` derives the placements from what the modules record:
- TernaryMatrix.tp_shard (TPShard): dim 0 -> rows [offset, +rows) of global_size rows; dim 1 ->
  columns [offset, +cols) of global_size columns, with the row exponent replicated.
- TernaryMatrix.row_start/row_stop (ZeRO): t_accum / e_accum hold only those local rows.
- a module with `bounds` and `rank` (row-sharded codebooks and KG edges): every tensor below it
  holds rows [bounds[rank], bounds[rank + 1]) of bounds[-1].
- MoEGraph experts keep their global index in their names, so an expert-parallel rank's keys are
  whole tensors that other ranks simply do not hold.

Loading is layout-free: a rank asks for its boxes and gets them cut from whatever pieces the
checkpoint has (`assemble`). `arbd-reshard` re-cuts the files offline, or `--export`s one
consolidated inference file (packed trits, exponents and float parameters; no accumulators).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from arbd.ternary import packing

ACCUMULATORS = ("t_accum", "e_accum")


@dataclass(frozen=True)
class Placement:
    """This rank's piece of one tensor (all tuples have the tensor's logical rank)."""
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    packed: bool = False  # stored as base-3 packed rows: the last dim counts trits

    @staticmethod
    def whole(shape: tuple[int, ...], packed: bool = False) -> "Placement":
        return Placement(tuple(shape), (0,) * len(shape), tuple(shape), packed)

    def stored_shape(self) -> tuple[int, ...]:
        if not self.packed:
            return self.lengths
        return (*self.lengths[:-1], packing.packed_cols(self.lengths[-1]))

    def box(self) -> list[list[int]]:
        return [list(self.offsets), list(self.lengths)]

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.global_shape), "offsets": list(self.offsets),
                "lengths": list(self.lengths), "packed": self.packed}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Placement":
        return Placement(tuple(d["shape"]), tuple(d["offsets"]), tuple(d["lengths"]), bool(d["packed"]))


def volume(lengths: Any) -> int:
    return math.prod(int(x) for x in lengths)


def intersect(a_off, a_len, b_off, b_len) -> tuple[list[int], list[int]] | None:
    """The common box of two boxes, or None."""
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a_off, a_len, b_off, b_len)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, [h - l for l, h in zip(lo, hi)]


# -- placements from a model -------------------------------------------------------------------
def _row_range_owner(model: nn.Module) -> dict[str, tuple[int, int]]:
    """module name -> (row offset, global rows) for row-sharded modules (`bounds` + `rank`)."""
    out = {}
    for name, mod in model.named_modules():
        bounds, rank = getattr(mod, "bounds", None), getattr(mod, "rank", None)
        if isinstance(bounds, (list, tuple)) and isinstance(rank, int) and len(bounds) > rank + 1:
            out[name] = (int(bounds[rank]), int(bounds[-1]))
    return out


def _owner_of(key: str, owners: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    best = None
    for name, rng in owners.items():
        if (name == "" or key.startswith(name + ".")) and (best is None or len(name) > len(best[0])):
            best = (name, rng)
    return None if best is None else best[1]


def placements_for(model: nn.Module, state: dict[str, Any] | None = None) -> dict[str, Placement]:
    """The Placement of every tensor in `model.state_dict()` (or `state`) on this rank."""
    from arbd.ternary.state import TernaryMatrix

    state = model.state_dict() if state is None else state
    out = {k: Placement.whole(tuple(v.shape)) for k, v in state.items() if torch.is_tensor(v)}
    owners = _row_range_owner(model)
    for k in out:  # plain buffers of row-sharded modules (codebook usage, KG edges)
        rng = _owner_of(k, owners)
        if rng is not None and out[k].lengths:
            out[k] = Placement((rng[1], *out[k].global_shape[1:]), (rng[0], *out[k].offsets[1:]),
                               out[k].lengths)
    for name, m in model.named_modules():
        if not isinstance(m, TernaryMatrix):
            continue
        pre = f"{name}." if name else ""
        r0, rows_g = 0, m.rows
        c0, cols_g = 0, m.cols
        rng = _owner_of(pre + "packed", owners)
        if rng is not None:
            r0, rows_g = rng
        tp = getattr(m, "tp_shard", None)
        if tp is not None and tp.dim == 0:
            r0, rows_g = r0 + tp.offset, tp.global_size
        elif tp is not None and tp.dim == 1:
            c0, cols_g = tp.offset, tp.global_size
        a, b = m.row_start, m.row_stop
        out[pre + "packed"] = Placement((rows_g, cols_g), (r0, c0), (m.rows, m.cols), packed=True)
        out[pre + "exponent"] = Placement((rows_g,), (r0,), (m.rows,))
        out[pre + "t_accum"] = Placement((rows_g, cols_g), (r0 + a, c0), (b - a, m.cols))
        out[pre + "e_accum"] = Placement((rows_g,), (r0 + a,), (b - a,))
    return {k: v for k, v in out.items() if k in state}


# -- checking and cutting pieces ---------------------------------------------------------------
def check_tiling(where: str, key: str, entry: dict[str, Any]) -> None:
    """The pieces of one tensor lie inside it, do not overlap and cover it exactly."""
    shape = entry["shape"]
    pieces = entry["pieces"]
    for p in pieces:
        if len(p["offsets"]) != len(shape) or any(
                o < 0 or n < 0 or o + n > s for o, n, s in zip(p["offsets"], p["lengths"], shape)):
            raise ValueError(f"{where}: {key}: piece {p['offsets']}+{p['lengths']} in {p['file']} lies "
                             f"outside the tensor's shape {shape}")
    for i, p in enumerate(pieces):
        for q in pieces[i + 1:]:
            if intersect(p["offsets"], p["lengths"], q["offsets"], q["lengths"]) is not None:
                raise ValueError(f"{where}: {key}: pieces in {p['file']} and {q['file']} overlap")
    covered = sum(volume(p["lengths"]) for p in pieces)
    if covered != volume(shape):
        raise ValueError(f"{where}: {key}: pieces cover {covered} of {volume(shape)} elements "
                         "(a shard is missing from the index)")


def assemble(key: str, entry: dict[str, Any], want: Placement,
             read: Callable[[str, str, tuple[slice, ...]], torch.Tensor]) -> torch.Tensor:
    """The tensor piece `want` of `key`, cut from the saved pieces. `read(file, key, slices)`
    returns a slice of one stored piece (in stored units: packed bytes for packed tensors)."""
    dtype = getattr(torch, entry["dtype"])
    packed = bool(entry["packed"])
    hits = []
    for p in entry["pieces"]:
        box = intersect(p["offsets"], p["lengths"], want.offsets, want.lengths)
        if box is not None:
            hits.append((p, box))
    got = sum(volume(box[1]) for _, box in hits)
    if got != volume(want.lengths):
        raise ValueError(f"{key}: the saved pieces cover {got} of the {volume(want.lengths)} "
                         f"elements asked for")
    if not packed:
        out = torch.empty(want.lengths, dtype=dtype)
        for p, (lo, n) in hits:
            src = tuple(slice(l - o, l - o + k) for l, o, k in zip(lo, p["offsets"], n))
            dst = tuple(slice(l - o, l - o + k) for l, o, k in zip(lo, want.offsets, n))
            out[dst] = read(p["file"], key, src)
        return out
    # Packed rows: copy bytes when a piece spans exactly the wanted columns, else go through trits.
    lead = len(want.lengths) - 1
    same_cols = all(p["offsets"][-1] == want.offsets[-1] and p["lengths"][-1] == want.lengths[-1]
                    for p, _ in hits)
    out = (torch.empty(want.stored_shape(), dtype=torch.uint8) if same_cols
           else torch.empty(want.lengths, dtype=torch.int8))
    for p, (lo, n) in hits:
        rows_src = tuple(slice(l - o, l - o + k) for l, o, k in zip(lo[:lead], p["offsets"][:lead], n[:lead]))
        rows_dst = tuple(slice(l - o, l - o + k) for l, o, k in zip(lo[:lead], want.offsets[:lead], n[:lead]))
        raw = read(p["file"], key, rows_src + (slice(None),))
        if same_cols:
            out[rows_dst + (slice(None),)] = raw
            continue
        trits = packing.unpack_trits(raw, p["lengths"][-1])
        c_src = lo[-1] - p["offsets"][-1]
        c_dst = lo[-1] - want.offsets[-1]
        out[rows_dst + (slice(c_dst, c_dst + n[-1]),)] = trits[..., c_src:c_src + n[-1]]
    return out if same_cols else packing.pack_trits(out)


def row_blocks_of(shape: tuple[int, ...], world: int, rank: int, packed: bool) -> Placement | None:
    """Rank `rank`'s contiguous dim-0 block of a tensor split over `world` files (None: empty)."""
    from arbd.ternary.zero import row_blocks

    if not shape:
        return Placement.whole(shape) if rank == 0 else None
    a, b = row_blocks(shape[0], world)[rank]
    if a == b:
        return None
    return Placement(tuple(shape), (a, *[0] * (len(shape) - 1)), (b - a, *shape[1:]), packed)


# -- the command ---------------------------------------------------------------------------------
def export_state(index: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What inference needs: everything but the accumulators (packed trits, exponents, float
    parameters and the model's buffers such as KG edges)."""
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in ACCUMULATORS}


def main(argv: list[str] | None = None) -> int:
    from arbd.train import checkpoint as ck

    p = argparse.ArgumentParser(
        prog="arbd-reshard",
        description="Re-cut an arbd checkpoint into the shard files of another world size, or "
                    "export one consolidated safetensors file for inference.")
    p.add_argument("src", help="a checkpoint directory, a save dir with a 'latest' pointer, or the pointer")
    p.add_argument("dst", help="target save dir (a new step-XXXXXXXX inside it), or with --export "
                           "the .safetensors file to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--world", type=int, help="write the model state as this many rank files")
    g.add_argument("--plan", help="shard plan YAML: its dp x tp is the world size; its preset must match")
    g.add_argument("--export", action="store_true", help="one inference file: no accumulators, "
                                                       "no optimizer or runtime state")
    args = p.parse_args(argv)
    try:
        if args.export:
            out = ck.export_checkpoint(args.src, args.dst)
        else:
            world, preset = args.world, None
            if args.plan:
                from arbd.parallel.plan import load_plan
                plan = load_plan(args.plan)
                world, preset = plan.layout.world, plan.preset
            if world is None or world < 1:
                raise ck.CheckpointError(f"--world must be >= 1, got {world}")
            out = ck.reshard_checkpoint(args.src, args.dst, world=world, preset=preset)
    except (ck.CheckpointError, ValueError, OSError) as e:
        print(f"arbd-reshard: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"wrote": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
