"""Checkpoints: per-rank safetensors shards + a JSON index, written atomically, read without
unpickling, loadable at another layout.

Layout of one checkpoint (`<save_dir>/step-XXXXXXXX/`):

    model-rank<r>.safetensors    the pieces of the model state rank r is the first holder of: its
                                 ZeRO rows of the accumulators, its codebook / KG-edge rows, its
                                 experts, its tensor-parallel slices, and (rank 0, usually) the
                                 replicated tensors. No rank gathers another rank's state.
    optimizer.safetensors        AdamW state per float parameter (small; rank 0)
    runtime-rank<r>.safetensors  what only rank r has: its KV ledger ("ledger.ids") and its own
                                 copy ("rank<r>/<key>") of every replicated buffer whose bytes
                                 differ between ranks (KG edges, codebook usage updated per batch)
    index.json                   format/version 2, step, plan, preset, model config, loader
                                 positions, per-rank RNG states, counters, loss history; for every
                                 tensor its dtype, global shape and pieces (file, offsets, lengths;
                                 packed trit matrices counted in trits); sha256 + size per file

Placements (arbd/train/reshard.py) say which box of which tensor a rank holds; a rank loads its
own boxes cut from whatever pieces exist, so a checkpoint loads at any tp / ep / dp / ZeRO layout.

Atomicity: every rank writes into `.tmp-step-XXXXXXXX-<token>`, fsyncs its files and then drops
a small manifest; rank 0 waits for all manifests, writes index.json, fsyncs, renames the
directory to `step-XXXXXXXX`, and only then replaces `latest`. A rank killed at any point leaves
the previous checkpoint and pointer whole; the next save removes the debris. With
`CheckpointWriter(async_save=True)` the file writing runs in a background thread after a
synchronous copy to CPU; the next save (or `wait()`) joins it.

Reading never unpickles: json for the index, safetensors for tensors. Every file is checked
(present, size, sha256), the pieces are checked to tile each tensor, and the index is checked
against the run (preset, model config, seq_len, global batch, seed) before anything in the run
is modified.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from arbd.fsutil import fsync_dir, fsync_file, sha256_file
from arbd.train.reshard import (Placement, assemble, check_tiling, export_state,  # noqa: F401
                                placements_for, row_blocks_of)

FORMAT = "arbd-checkpoint"
VERSION = 2
INDEX = "index.json"
OPTIM_FILE = "optimizer.safetensors"
LATEST = "latest"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def model_file(rank: int) -> str:
    return f"model-rank{rank:05d}.safetensors"


def runtime_file(rank: int) -> str:
    return f"runtime-rank{rank:05d}.safetensors"


def _manifest(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# -- small helpers ---------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """Dataclasses, tuples and numpy scalars as plain JSON values."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_json(obj: Any, group=None) -> list[Any]:
    """Every rank's JSON-able `obj`, on every rank, through tensors (no pickling on the wire)."""
    if not _dist_on() or dist.get_world_size(group) == 1:
        return [obj]
    raw = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    n = torch.tensor([raw.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[:raw.numel()] = raw
    outs = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(outs, padded, group=group)
    return [json.loads(bytes(o[:int(s.item())].tolist()).decode()) for o, s in zip(outs, sizes)]


# -- RNG states as JSON ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"torch": torch.get_rng_state().tolist(),
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                     float(np_state[4])],
           "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]  # one per device
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        # A checkpoint from more devices than this process sees restores the ones it has.
        states = s["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(x, dtype=torch.uint8) for x in states])
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# -- float parameters' AdamW state through DeepSpeed -----------------------------------------
def _flat_groups(engine) -> list[tuple[torch.Tensor, dict, object, list, list[int]]] | None:
    """How DeepSpeed's wrapper lays the float parameters out, or None when the engine's
    optimizer keeps its state per parameter. Per param group: (this rank's fp32 slice of the
    flat buffer, the inner optimizer's state dict keyed by that slice, the dp group, the
    parameters in flat order, their offsets in the whole flat buffer).

    ZeRO stage 1/2 (`single_partition_of_fp32_groups`) and the bf16 optimizer DeepSpeed uses at
    stage 0 with bf16 (`fp32_groups_flat_partition`) both keep one flat fp32 buffer per group,
    cut into equal slices over the dp group, with the AdamW state keyed by the slice."""
    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return [(part, opt.optimizer.state, opt.real_dp_process_group[i],
                 list(opt.round_robin_bit16_groups[i]), list(opt.round_robin_bit16_offsets[i]))
                for i, part in enumerate(opt.single_partition_of_fp32_groups)]
    if hasattr(opt, "fp32_groups_flat_partition") and hasattr(opt, "bf16_groups"):
        out = []
        for i, part in enumerate(opt.fp32_groups_flat_partition):
            params = list(opt.bf16_groups[i])
            offsets = [sum(q.numel() for q in params[:j]) for j in range(len(params))]
            out.append((part, opt.optimizer.state, opt.real_dp_process_group[i], params, offsets))
        return out
    return None


def _param_names(model: torch.nn.Module, engine=None) -> dict[int, str]:
    """id -> parameter name, the fp32 master copies of DeepSpeed's per-parameter 16-bit wrapper
    (FP16_UnfusedOptimizer: `fp16_groups[i][j]` trained through `fp32_groups[i][j]`, the tensor
    the AdamW state is keyed by) included under their parameter's name."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        for low, masters in zip(opt.fp16_groups, opt.fp32_groups):
            if isinstance(masters, (list, tuple)):
                for p, master in zip(low, masters):
                    names[id(master)] = names[id(p)]
    return names


def gather_float_state(engine, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AdamW state (exp_avg, exp_avg_sq, step) per float parameter name, whole, on every rank.

    Under DeepSpeed's flat layouts (_flat_groups) each dp rank holds one slice of a flat fp32
    buffer per param group and the AdamW state of that slice: the slices are all-gathered and cut
    back into parameters. Otherwise the state is keyed by the parameters themselves. Collective
    under the flat layouts."""
    names = _param_names(model, engine)
    out: dict[str, torch.Tensor] = {}
    groups = _flat_groups(engine)
    if groups is None:
        opt = getattr(engine, "optimizer", None) or engine
        for p, st in opt.state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"{names[id(p)]}.{k}"] = v.detach().cpu().clone().reshape(v.shape)
        return out
    for part, states, g, params, offsets in groups:
        st = states.get(part, {})
        world = dist.get_world_size(g) if _dist_on() else 1
        for key in ("exp_avg", "exp_avg_sq"):
            local = st.get(key)
            have = torch.tensor([0 if local is None else 1])
            if world > 1:
                dist.all_reduce(have, op=dist.ReduceOp.MIN, group=g)
            if not int(have):
                continue  # no step taken yet: nothing to save
            pieces = [torch.zeros_like(local) for _ in range(world)]
            if world > 1:
                dist.all_gather(pieces, local.contiguous(), group=g)
            else:
                pieces = [local]
            flat = torch.cat(pieces).cpu()
            for p, off in zip(params, offsets):
                out[f"{names[id(p)]}.{key}"] = flat[off:off + p.numel()].view(p.shape).clone()
        if "step" in st:
            step = st["step"]
            step = step.detach().cpu().clone() if torch.is_tensor(step) else torch.tensor(float(step))
            for p in params:
                out[f"{names[id(p)]}.step"] = step.clone()
    return out


@torch.no_grad()
def load_float_state(engine, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put whole AdamW state (gather_float_state's form) back, re-sliced for this dp rank, and
    refresh the fp32 master slices from the (already loaded) model parameters."""
    names = _param_names(model, engine)
    groups = _flat_groups(engine)
    if groups is None:
        opt = getattr(engine, "optimizer", None) or engine
        if hasattr(opt, "refresh_fp32_params"):   # fp32 masters from the loaded 16-bit params
            opt.refresh_fp32_params()
        for group in opt.param_groups:
            for p in group["params"]:
                n = names[id(p)]
                # Moments live with their parameter (the GPU); torch's AdamW keeps `step` on the CPU.
                st = {k: state[f"{n}.{k}"].to(p.device, p.dtype) for k in ("exp_avg", "exp_avg_sq")
                      if f"{n}.{k}" in state}
                if f"{n}.step" in state:
                    st["step"] = state[f"{n}.step"].clone()
                if st:
                    opt.state[p] = st
        return
    for part, states, g, params, offsets in groups:
        rank = dist.get_rank(g) if _dist_on() else 0
        world = dist.get_world_size(g) if _dist_on() else 1
        size = part.numel()
        lo, hi = rank * size, (rank + 1) * size

        def sliced(key: str | None) -> torch.Tensor:
            flat = torch.zeros(size * world, dtype=part.dtype)
            for p, off in zip(params, offsets):
                src = p.detach().cpu() if key is None else state[f"{names[id(p)]}.{key}"]
                flat[off:off + p.numel()] = src.reshape(-1).to(part.dtype)
            return flat[lo:hi].to(part.device)

        part.data.copy_(sliced(None))
        first = names[id(params[0])]
        if f"{first}.exp_avg" in state:
            st = states.setdefault(part, {})
            st["exp_avg"] = sliced("exp_avg")
            st["exp_avg_sq"] = sliced("exp_avg_sq")
            st["step"] = state[f"{first}.step"].clone()


# -- per-rank runtime memory (the KV ledger carries predictions from one batch to the next) ----
def ledger_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's ledger ids (if any) and write count; saved in this rank's runtime file."""
    led = getattr(model, "ledger", None)
    if led is None or led.ids is None:
        return {}, 0 if led is None else int(led.count)
    return {"ledger.ids": led.ids.detach()}, int(led.count)


def load_ledger(model: torch.nn.Module, tensors: dict[str, torch.Tensor], counts: list[int],
                rank: int, world: int) -> None:
    """Same world size: each rank its own ledger back. Otherwise the ledger restarts empty
    (its rows belonged to other ranks' batches; documented as not bit-exact)."""
    led = getattr(model, "ledger", None)
    if led is None:
        return
    led.reset()
    if len(counts) == world and "ledger.ids" in tensors:
        led.ids = tensors["ledger.ids"].clone().to(next(model.parameters()).device)
        led.count = counts[rank]


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def rank_state(index: dict[str, Any], model_state: dict[str, torch.Tensor],
               runtime: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The state_dict this rank loads: the model file's pieces, with this rank's own copy of each
    divergent entry when the world size is the one saved (at another world size the first
    holder's copy, rank 0's for replicated buffers, serves)."""
    out = dict(model_state)
    if index["world"] == world:
        for k in index.get("rank_keys", []):
            own = runtime.get(f"rank{rank}/{k}")
            if own is not None and k in out:
                out[k] = own
    return out


# -- test-only fault injection (elastic and crash-mid-save tests) ------------------------------
def _test_kill(point: str, step: int, rank: int) -> None:
    """SIGKILL this process once when ARBD_TEST_KILL=<point>:<step>:<rank> matches; the file
    ARBD_TEST_KILL_MARK records that it fired, so the restarted run goes on."""
    spec, mark = os.environ.get("ARBD_TEST_KILL"), os.environ.get("ARBD_TEST_KILL_MARK")
    if not spec or not mark or spec != f"{point}:{step}:{rank}" or os.path.exists(mark):
        return
    with open(mark, "w") as f:
        f.write(f"{spec}\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def arm_test_kill(model: torch.nn.Module, steps_done, rank: int) -> None:
    """With ARBD_TEST_KILL=step:<k>:<rank> set, rank <rank> SIGKILLs itself in the first forward
    of step k (`steps_done()` = optimizer steps finished). Nothing is installed otherwise."""
    if not os.environ.get("ARBD_TEST_KILL", "").startswith("step:"):
        return
    model.register_forward_pre_hook(lambda *_: _test_kill("step", steps_done() + 1, rank))


# -- writing -------------------------------------------------------------------------------------
def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    on = _dist_on()
    return (dist.get_rank() if on else 0) if rank is None else rank, \
           (dist.get_world_size() if on else 1) if world is None else world


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # A private contiguous copy: training may change the original while a background save writes.
    return t.detach().to("cpu", copy=True).contiguous()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    save_file(tensors, str(path))
    fsync_file(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=1))
    fsync_file(tmp)
    os.replace(tmp, path)


def plan_writes(holdings: list[dict[str, Any]]) -> tuple[list[set[str]], list[str]]:
    """Given every rank's {key: [box, digest or None]}, which keys each rank writes to its model
    file (the first holder of each box) and which replicated keys differ between holders."""
    first: dict[tuple[str, str], tuple[int, Any]] = {}
    writes: list[set[str]] = [set() for _ in holdings]
    divergent: set[str] = set()
    for r, held in enumerate(holdings):
        for key, (box, digest) in held.items():
            tag = (key, json.dumps(box))
            if tag not in first:
                first[tag] = (r, digest)
                writes[r].add(key)
            elif digest != first[tag][1]:
                divergent.add(key)
    return writes, sorted(divergent)


def _write_rank(tmp: Path, rank: int, step: int, tensors: dict[str, torch.Tensor],
                placements: dict[str, Placement], runtime: dict[str, torch.Tensor],
                floats: dict[str, torch.Tensor] | None, rank_meta: dict[str, Any]) -> None:
    """One rank's files and, last, its manifest (the sign that its files are complete)."""
    files, pieces = {}, {}
    if tensors:
        name = model_file(rank)
        files[name] = _write_safetensors(tmp / name, tensors)
        for k, t in tensors.items():
            pieces[k] = {**placements[k].to_json(), "dtype": str(t.dtype).removeprefix("torch."),
                         "file": name}
    _test_kill("save", step, rank)  # test knob: die with the shard written, manifest not
    if runtime:
        files[runtime_file(rank)] = _write_safetensors(tmp / runtime_file(rank), runtime)
    if floats is not None:
        files[OPTIM_FILE] = _write_safetensors(tmp / OPTIM_FILE, floats)
    _write_json(tmp / _manifest(rank), {"rank": rank, "files": files, "pieces": pieces,
                                        "runtime": runtime_file(rank) if runtime else None,
                                        "rank_meta": rank_meta})


def _finish(root: Path, tmp: Path, step: int, world: int, meta: dict[str, Any],
            divergent: list[str], keep_last: int, timeout: float) -> Path:
    """Rank 0: wait for every rank's manifest, write the index, rename into place, then move
    `latest` and prune."""
    deadline = time.monotonic() + timeout
    paths = [tmp / _manifest(r) for r in range(world)]
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"{tmp}: ranks never finished their part of the save: {missing}")
        time.sleep(0.01)
    manifests = [json.loads(p.read_text()) for p in paths]
    tensors: dict[str, dict[str, Any]] = {}
    files: dict[str, Any] = {}
    for m in manifests:
        files.update(m["files"])
        for k, p in m["pieces"].items():
            e = tensors.setdefault(k, {"shape": p["shape"], "dtype": p["dtype"],
                                       "packed": p["packed"], "pieces": []})
            e["pieces"].append({"file": p["file"], "offsets": p["offsets"], "lengths": p["lengths"]})
    per_rank = {k: [m["rank_meta"].get(k) for m in manifests]
                for k in sorted({k for m in manifests for k in m["rank_meta"]})}
    index = {"format": FORMAT, "version": VERSION, "step": step, **_jsonable(meta), **per_rank,
             "writers": world, "rank_keys": divergent,
             "runtime_files": [m["runtime"] for m in manifests],
             "tensors": dict(sorted(tensors.items())), "files": dict(sorted(files.items()))}
    index.setdefault("world", world)
    for k, e in index["tensors"].items():
        check_tiling(str(tmp / INDEX), k, e)  # a writer bug must not produce a checkpoint
    _write_json(tmp / INDEX, index)
    for p in paths:
        p.unlink()
    fsync_dir(tmp)
    final = root / step_dir_name(step)
    old = None
    if final.exists():  # re-saving the same step: move the old one aside, swap, then drop it
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    ptr = root / f".{LATEST}.tmp-{os.getpid()}"
    ptr.write_text(final.name + "\n")
    fsync_file(ptr)
    os.replace(ptr, root / LATEST)
    fsync_dir(root)
    prune(root, keep_last)
    return final


class CheckpointWriter:
    """Writes checkpoints; with async_save the file work runs in a background thread.

    `save` is collective when torch.distributed is initialised (two small JSON all-gathers: which
    boxes each rank holds, then digests of the boxes several ranks hold). It copies what this rank
    writes to CPU, then writes its files (inline, or in the thread). Rank 0 also writes the index
    and renames; in async mode a rank's next `save` first joins its previous one."""

    def __init__(self, async_save: bool = False, timeout: float = 1800.0) -> None:
        self.async_save, self.timeout = async_save, timeout
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: Path | None = None

    def wait(self) -> Path | None:
        """Join the save in flight (if any); re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self.last

    def save(self, save_dir: str | Path, step: int, *, model_state: dict[str, Any],
             float_state: dict[str, torch.Tensor], meta: dict[str, Any],
             placements: dict[str, Placement] | None = None,
             runtime_state: dict[str, torch.Tensor] | None = None,
             rank_meta: dict[str, Any] | None = None, keep_last: int = 3,
             rank: int | None = None, world: int | None = None) -> Path:
        """Save this rank's part of checkpoint `step`; returns where it will be.

        model_state: this rank's state_dict (non-tensors such as `_extra_state` are skipped).
        placements: the box of each tensor this rank holds (default: whole tensors).
        float_state: used on rank 0 only. runtime_state / rank_meta: this rank's own
        (ledger, RNG ...); rank_meta values become per-rank lists in the index."""
        self.wait()
        rank, world = _rank_world(rank, world)
        root = Path(save_dir)
        tensors = {k: v for k, v in model_state.items() if torch.is_tensor(v)}
        placements = placements or {}
        places = {k: placements.get(k) or Placement.whole(tuple(v.shape)) for k, v in tensors.items()}
        for k, pl in places.items():
            if tuple(tensors[k].shape) != pl.stored_shape():
                raise ValueError(f"{k}: tensor {tuple(tensors[k].shape)} does not match its placement "
                                 f"{pl} (stored shape {pl.stored_shape()})")
        token = None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f".tmp-{PREFIX}*"):  # a crashed save's debris: never a checkpoint
                shutil.rmtree(stale, ignore_errors=True)
            token = f"{os.getpid()}-{time.time_ns()}"
        boxes = {k: pl.box() for k, pl in places.items()}
        gathered = _gather_json({"token": token, "boxes": boxes})
        token = gathered[0]["token"]
        shared = _held_by_several([g["boxes"] for g in gathered])
        digests = _gather_json({k: _digest(tensors[k]) for k in sorted(shared & set(tensors))})
        holdings = [{k: [box, d.get(k)] for k, box in g["boxes"].items()}
                    for g, d in zip(gathered, digests)]
        writes, divergent = plan_writes(holdings)
        mine = {k: _cpu_copy(tensors[k]) for k in sorted(writes[rank])}
        runtime = {k: _cpu_copy(v) for k, v in (runtime_state or {}).items()}
        runtime.update({f"rank{rank}/{k}": _cpu_copy(tensors[k]) for k in divergent if k in tensors})
        floats = {k: _cpu_copy(v) for k, v in float_state.items()} if rank == 0 else None
        tmp = root / f".tmp-{step_dir_name(step)}-{token}"
        tmp.mkdir(parents=True, exist_ok=True)
        # Snapshot the meta now: the training thread keeps appending to its history.
        rmeta = json.loads(json.dumps(_jsonable(rank_meta or {})))
        meta = json.loads(json.dumps(_jsonable(meta)))
        final = root / step_dir_name(step)

        def job() -> None:
            _write_rank(tmp, rank, step, mine, places, runtime, floats, rmeta)
            if rank == 0:
                _finish(root, tmp, step, world, meta, divergent, keep_last, self.timeout)

        self.last = final
        if not self.async_save:
            job()
            return final

        def run() -> None:
            try:
                job()
            except BaseException as e:  # surfaced by the next wait()
                self._error = e
        self._thread = threading.Thread(target=run, name=f"arbd-save-{step}", daemon=False)
        self._thread.start()
        return final


def _held_by_several(all_boxes: list[dict[str, Any]]) -> set[str]:
    seen: dict[tuple[str, str], int] = {}
    for boxes in all_boxes:
        for k, b in boxes.items():
            tag = (k, json.dumps(b))
            seen[tag] = seen.get(tag, 0) + 1
    return {k for (k, _), n in seen.items() if n > 1}


def save_checkpoint(save_dir: str | Path, step: int, *, model_state: dict[str, Any],
                    float_state: dict[str, torch.Tensor], meta: dict[str, Any],
                    placements: dict[str, Placement] | None = None,
                    runtime_state: dict[str, torch.Tensor] | None = None,
                    rank_meta: dict[str, Any] | None = None, keep_last: int = 3,
                    rank: int | None = None, world: int | None = None) -> Path:
    """A synchronous `CheckpointWriter().save(...)`: this rank's files written when it returns
    (on rank 0: the whole checkpoint renamed into place and `latest` moved)."""
    return CheckpointWriter().save(save_dir, step, model_state=model_state, float_state=float_state,
                                   meta=meta, placements=placements, runtime_state=runtime_state,
                                   rank_meta=rank_meta, keep_last=keep_last, rank=rank, world=world)


def write_offline(save_dir: str | Path, step: int, ranks: list[dict[str, Any]], *,
                  float_state: dict[str, torch.Tensor], meta: dict[str, Any],
                  rank_keys: list[str] = (), keep_last: int = 0) -> Path:
    """Write a checkpoint of len(ranks) ranks from one process (arbd-reshard, tests). Each entry:
    {"state": ..., "placements": ... (optional), "runtime": ..., "rank_meta": ... (optional)}.
    `rank_keys`: divergent keys whose per-rank copies the runtime entries already carry."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    states, places = [], []
    for r in ranks:
        pl = r.get("placements") or {}
        st = {k: v for k, v in r["state"].items() if torch.is_tensor(v)}
        states.append(st)
        places.append({k: pl.get(k) or Placement.whole(tuple(v.shape)) for k, v in st.items()})
    writes, divergent = plan_writes([{k: [places[i][k].box(), _digest(v)] for k, v in st.items()}
                                     for i, st in enumerate(states)])
    for rk, (r, st) in enumerate(zip(ranks, states)):
        runtime = {k: _cpu_copy(v) for k, v in (r.get("runtime") or {}).items()}
        runtime.update({f"rank{rk}/{k}": _cpu_copy(st[k]) for k in divergent if k in st})
        _write_rank(tmp, rk, step, {k: _cpu_copy(st[k]) for k in sorted(writes[rk])}, places[rk],
                    runtime, float_state if rk == 0 else None, _jsonable(r.get("rank_meta") or {}))
    return _finish(root, tmp, step, len(ranks), meta, sorted(set(divergent) | set(rank_keys)),
                   keep_last, timeout=0.0)


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Finished checkpoints (renamed into place), oldest first."""
    root = Path(save_dir)
    out = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(out, key=lambda p: int(p.name[len(PREFIX):]))


def prune(save_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    if keep_last <= 0:
        return
    root = Path(save_dir)
    keep = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    for p in list_checkpoints(root)[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------
def resolve(spec: str | Path, save_dir: str | Path | None = None) -> Path:
    """`latest` (the pointer in save_dir), a save dir holding a `latest` pointer, or a step dir."""
    p = Path(save_dir) / LATEST if str(spec) == LATEST and save_dir is not None else Path(spec)
    if p.is_dir() and (p / LATEST).is_file():
        p = p / LATEST
    if p.is_file() and p.name == LATEST:
        name = p.read_text().strip()
        if not name.startswith(PREFIX) or "/" in name:
            raise CheckpointError(f"{p}: pointer holds {name!r}, not a {PREFIX}XXXXXXXX name")
        p = p.parent / name
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    return p


def resolve_resume(spec: str | None, save_dir: str | Path) -> str | Path | None:
    """--resume: 'auto' is the `latest` pointer in save_dir when there is one, else a fresh start
    (None). A pointer that exists but names a bad checkpoint is still refused, not skipped."""
    if spec != "auto":
        return spec
    return LATEST if (Path(save_dir) / LATEST).is_file() else None


def read_index(ckpt: Path) -> dict[str, Any]:
    path = ckpt / INDEX
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file (every checkpoint has an {INDEX})")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} index")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {index.get('version')!r}, this reader "
                              f"knows version {VERSION}")
    for k, e in index.get("tensors", {}).items():
        try:
            check_tiling(str(path), k, e)
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: malformed entry for tensor {k!r} ({err})") from None
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    return index


def verify_files(ckpt: Path, index: dict[str, Any], names: list[str] | None = None) -> None:
    """Every listed file (or those in `names`) is there, whole (size) and unchanged (sha256)."""
    for name in index["files"] if names is None else names:
        info = index["files"].get(name)
        path = ckpt / name
        if info is None:
            raise CheckpointError(f"{path}: used by {INDEX} but not listed under its files")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing file listed in {INDEX}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: truncated or resized: {size} bytes, {INDEX} records "
                                  f"{info['bytes']}")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise CheckpointError(f"{path}: sha256 mismatch: file {digest[:16]}..., {INDEX} "
                                  f"records {info['sha256'][:16]}... (corrupted)")


def check_compatible(ckpt: Path, index: dict[str, Any], *, plan: Any, config: Any, seed: int) -> None:
    """Refuse an index whose run this one cannot continue. The layout (dp, tp, ep, ZeRO stage)
    may differ: tensors are re-cut on load; the global shapes are checked there."""
    where = ckpt / INDEX
    if index["preset"] != plan.preset:
        raise CheckpointError(f"{where}: written for preset {index['preset']!r}, this run uses "
                              f"{plan.preset!r}")
    cfg = _jsonable(config)
    if index["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(index["config"])
                      if cfg.get(k) != index["config"].get(k))
        raise CheckpointError(f"{where}: model config differs from this run's in {diff}; "
                              "resume with the saved run's preset, plan `model:` overrides and "
                              "--no-*/--*-weight flags")
    saved = index["plan"]
    gb = saved["micro_batch"] * saved["grad_accum"] * saved["layout"]["dp"]
    for key, theirs, mine in (("seq_len", saved["seq_len"], plan.seq_len),
                              ("global batch", gb, plan.global_batch),
                              ("seed", index["seed"], seed)):
        if theirs != mine:
            raise CheckpointError(f"{where}: incompatible plan: saved {key}={theirs}, this run "
                                  f"has {mine} (the data order would differ)")


class _Reader:
    """Opens each safetensors file once and reads slices of it (no whole-file loads)."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt, self.files = ckpt, {}

    def __call__(self, name: str, key: str, slices: tuple[slice, ...]) -> torch.Tensor:
        path = self.ckpt / name
        try:
            if name not in self.files:
                self.files[name] = safe_open(str(path), framework="pt")
            return self.files[name].get_slice(key)[slices]
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot read {key!r} ({e})") from None


def whole_placements(index: dict[str, Any], keys) -> dict[str, Placement]:
    """Whole-tensor placements for `keys` (an unsharded model), from the index's shapes."""
    out = {}
    for k in keys:
        e = index["tensors"].get(k)
        if e is not None:
            out[k] = Placement.whole(tuple(e["shape"]), bool(e["packed"]))
    return out


def files_for(index: dict[str, Any], placements: dict[str, Placement]) -> list[str]:
    """The model files holding any piece a rank with these placements needs."""
    from arbd.train.reshard import intersect
    need = set()
    for k, pl in placements.items():
        for p in index["tensors"].get(k, {}).get("pieces", []):
            if intersect(p["offsets"], p["lengths"], pl.offsets, pl.lengths) is not None:
                need.add(p["file"])
    return sorted(need)


def load_model_state(ckpt: Path, index: dict[str, Any], placements: dict[str, Placement],
                     dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """This rank's tensors, each cut to its placement from the saved pieces."""
    where = ckpt / INDEX
    missing = sorted(set(placements) - set(index["tensors"]))
    if missing:
        raise CheckpointError(f"{where}: tensors do not match the model: missing {missing[:5]}")
    read, out = _Reader(ckpt), {}
    for k, pl in placements.items():
        e = index["tensors"][k]
        if tuple(e["shape"]) != pl.global_shape or bool(e["packed"]) != pl.packed:
            raise CheckpointError(f"{where}: {k} is {tuple(e['shape'])} (packed={e['packed']}) in "
                                  f"the checkpoint, the model has {pl.global_shape} (packed={pl.packed})")
        saved = getattr(torch, e["dtype"])
        # Integer state (packed trits, exponents, accumulators, counts) must match exactly; a
        # float parameter may differ in width: DeepSpeed's bf16 engine saves it in bf16 and the
        # model is built in fp32 before the engine casts it (load_state_dict copies across).
        if dtypes is not None and saved != dtypes[k] and not (saved.is_floating_point
                                                              and dtypes[k].is_floating_point):
            raise CheckpointError(f"{where}: {k} is {e['dtype']}, the model has {dtypes[k]}")
        try:
            out[k] = assemble(k, e, pl, read)
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
    return out


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None


def runtime_for(ckpt: Path, index: dict[str, Any], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The runtime file this rank restores: its own at the saved world size, else rank 0's."""
    files = index.get("runtime_files", [])
    r = rank if index["world"] == world and rank < len(files) else 0
    name = files[r] if r < len(files) else None
    return {} if name is None else _load_tensors(ckpt / name)


def read_checkpoint(spec: str | Path, *, plan: Any, config: Any, seed: int,
                    model_state: dict[str, Any], save_dir: str | Path | None = None,
                    placements: dict[str, Placement] | None = None,
                    rank: int | None = None, world: int | None = None
                    ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor],
                               dict[str, torch.Tensor]]:
    """Resolve, verify and read a checkpoint for this rank; raises CheckpointError before
    touching any run state. `model_state` is the state_dict of the model it is loaded into
    (this rank's pieces when `placements` says so; whole tensors by default).

    Returns (path, index, this rank's model tensors, AdamW state, this rank's runtime tensors)."""
    rank, world = _rank_world(rank, world)
    ckpt = resolve(spec, save_dir)
    index = read_index(ckpt)
    verify_files(ckpt, index)
    check_compatible(ckpt, index, plan=plan, config=config, seed=seed)
    keys = [k for k, v in model_state.items() if torch.is_tensor(v)]
    places = placements or whole_placements(index, keys)
    where = ckpt / INDEX
    # Under expert parallelism a rank holds only its experts: compare the union of every rank's
    # keys with the checkpoint's (collective when distributed; every rank got this far).
    union = set().union(*(set(k) for k in _gather_json(sorted(keys)))) if placements else set(keys)
    missing, extra = sorted(set(keys) - set(index["tensors"])), sorted(set(index["tensors"]) - union)
    if missing or extra:
        raise CheckpointError(f"{where}: tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    tensors = load_model_state(ckpt, index, places, {k: model_state[k].dtype for k in keys})
    for k in keys:
        if tensors[k].shape != model_state[k].shape:
            raise CheckpointError(f"{where}: {k} loads as {tuple(tensors[k].shape)}, the model "
                                  f"has {tuple(model_state[k].shape)}")
    # Non-tensor entries (a shard's `_extra_state`) describe the model loaded into: keep them.
    tensors.update({k: v for k, v in model_state.items() if not torch.is_tensor(v)})
    floats = _load_tensors(ckpt / OPTIM_FILE) if OPTIM_FILE in index["files"] else {}
    return ckpt, index, tensors, floats, runtime_for(ckpt, index, rank, world)


def read_whole(spec: str | Path, save_dir: str | Path | None = None
               ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """A verified checkpoint's whole model state (every tensor assembled unsharded)."""
    ckpt = resolve(spec, save_dir)
    index = read_index(ckpt)
    verify_files(ckpt, index)
    return ckpt, index, load_model_state(ckpt, index, whole_placements(index, index["tensors"]))


# -- offline conversion (arbd-reshard) ----------------------------------------------------------
def reshard_checkpoint(src: str | Path, dst: str | Path, *, world: int,
                       preset: str | None = None) -> Path:
    """Re-cut a checkpoint's model state into `world` rank files (row blocks of every tensor) in
    save dir `dst`; the optimizer and runtime files and the run's meta are carried over as they
    are. The rewritten checkpoint holds bit-identical tensors."""
    ckpt = resolve(src)
    index = read_index(ckpt)
    verify_files(ckpt, index)
    if preset is not None and index["preset"] != preset:
        raise CheckpointError(f"{ckpt / INDEX}: written for preset {index['preset']!r}, the "
                              f"target plan uses {preset!r}")
    if Path(dst).resolve() == ckpt.parent.resolve():
        raise CheckpointError(f"{dst}: is the source's own save dir; choose another")
    read = _Reader(ckpt)
    runtime_files = index.get("runtime_files", [])
    ranks = []
    # Writers = max(world, the saving run's ranks): runtime files belong to the run's ranks.
    for r in range(max(world, len(runtime_files))):
        places = {}
        for k, e in index["tensors"].items():
            pl = row_blocks_of(tuple(e["shape"]), world, r, bool(e["packed"])) if r < world else None
            if pl is not None:
                places[k] = pl
        state = {k: assemble(k, index["tensors"][k], pl, read) for k, pl in places.items()}
        name = runtime_files[r] if r < len(runtime_files) else None
        runtime = _load_tensors(ckpt / name) if name else {}
        ranks.append({"state": state, "placements": places, "runtime": runtime})
    carried = {k: v for k, v in index.items()
               if k not in ("format", "version", "step", "files", "tensors", "writers",
                            "runtime_files", "rank_keys")}
    floats = _load_tensors(ckpt / OPTIM_FILE) if OPTIM_FILE in index["files"] else {}
    return write_offline(dst, index["step"], ranks, float_state=floats, meta=carried,
                         rank_keys=index.get("rank_keys", []))


def export_checkpoint(src: str | Path, out: str | Path) -> Path:
    """One consolidated safetensors file for inference: every tensor whole, no accumulators,
    with preset, step and model config in the header metadata. Written atomically."""
    ckpt, index, tensors = read_whole(src)
    keep = export_state(index, tensors)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    meta = {"format": "arbd-export", "preset": str(index["preset"]), "step": str(index["step"]),
            "config": json.dumps(index.get("config", {})), "source": str(ckpt)}
    save_file({k: v.contiguous() for k, v in sorted(keep.items())}, str(tmp), metadata=meta)
    fsync_file(tmp)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out
