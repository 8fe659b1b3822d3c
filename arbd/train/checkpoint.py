"""Checkpoints: safetensors + a JSON index, written atomically, read without unpickling.

Layout of one checkpoint (`<save_dir>/step-XXXXXXXX/`):

    model.safetensors      the model's whole (unpartitioned) state_dict: packed trits, exponents,
                           t/e accumulators, KG edges, codebook usage, float parameters
    optimizer.safetensors  AdamW state per float parameter, unpartitioned:
                           "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.step"
    runtime.safetensors    what differs between dp ranks, one copy per rank: the KV ledger
                           ("ledger.ids.rank<r>", write counts in the index) and state_dict
                           buffers each rank updates from its own batches (KG edges, codebook
                           usage: "rank<r>/<key>", the keys listed in the index)
    index.json             format/version, step, plan, preset, model config, loader positions,
                           RNG states (per rank, as ints/lists), counters, loss history, and a
                           sha256 + byte size for every file above

One consolidated file per kind, written by rank 0 from `ZeroPartitioner.gather_full_state()`:
the layout-independent form, so a checkpoint loads at any dp (each rank re-partitions on load)
and one writer makes the atomic rename trivial. Cost: rank 0 holds the whole state once per
save, fine for the presets trained through this trainer today; per-rank shard files are the
next step for models whose state does not fit one host (see docs/decisions.md).

Atomicity: rank 0 writes into `.tmp-step-XXXXXXXX-<pid>` in the same directory, fsyncs every
file and the directory, renames it to `step-XXXXXXXX`, then replaces `latest` (temp file +
os.replace) last. A crash at any point leaves the previous checkpoint and pointer whole.

Reading never unpickles: json for the index, safetensors for tensors. Every file is checked
(present, size, sha256) and the index is checked against the run (preset, model config, tp/ep,
seq_len, global batch, seed) before anything in the run is modified.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from arbd.fsutil import fsync_dir, fsync_file, sha256_file

FORMAT = "arbd-checkpoint"
VERSION = 1
INDEX = "index.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RUNTIME_FILE = "runtime.safetensors"
LATEST = "latest"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


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
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# -- float parameters' AdamW state through DeepSpeed -----------------------------------------
def _zero_optimizer(engine):
    """DeepSpeed's ZeRO stage 1/2 optimizer if the engine uses one, else None."""
    opt = getattr(engine, "optimizer", None)
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def gather_float_state(engine, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AdamW state (exp_avg, exp_avg_sq, step) per float parameter name, whole, on every rank.

    Under ZeRO 1/2 each dp rank holds one slice of a flat fp32 buffer per param group and the
    AdamW state of that slice: the slices are all-gathered and cut back into parameters. Without
    ZeRO the state is keyed by the parameters themselves. Collective under ZeRO."""
    names = _param_names(model)
    out: dict[str, torch.Tensor] = {}
    zo = _zero_optimizer(engine)
    if zo is None:
        opt = getattr(engine, "optimizer", None) or engine
        for p, st in opt.state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"{names[id(p)]}.{k}"] = v.detach().cpu().clone().reshape(v.shape)
        return out
    group = zo.real_dp_process_group[0] if hasattr(zo, "real_dp_process_group") else None
    for i, part in enumerate(zo.single_partition_of_fp32_groups):
        st = zo.optimizer.state.get(part, {})
        g = zo.real_dp_process_group[i] if hasattr(zo, "real_dp_process_group") else group
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
            for p, off in zip(zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i]):
                out[f"{names[id(p)]}.{key}"] = flat[off:off + p.numel()].view(p.shape).clone()
        if "step" in st:
            step = st["step"]
            step = step.detach().cpu().clone() if torch.is_tensor(step) else torch.tensor(float(step))
            for p in zo.round_robin_bit16_groups[i]:
                out[f"{names[id(p)]}.step"] = step.clone()
    return out


@torch.no_grad()
def load_float_state(engine, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put whole AdamW state (gather_float_state's form) back, re-sliced for this dp rank, and
    refresh ZeRO's fp32 master slices from the (already loaded) model parameters."""
    names = _param_names(model)
    zo = _zero_optimizer(engine)
    if zo is None:
        opt = getattr(engine, "optimizer", None) or engine
        for group in opt.param_groups:
            for p in group["params"]:
                n = names[id(p)]
                st = {k: state[f"{n}.{k}"].clone() for k in ("exp_avg", "exp_avg_sq", "step")
                      if f"{n}.{k}" in state}
                if st:
                    opt.state[p] = st
        return
    for i, part in enumerate(zo.single_partition_of_fp32_groups):
        g = zo.real_dp_process_group[i]
        rank = dist.get_rank(g) if _dist_on() else 0
        world = dist.get_world_size(g) if _dist_on() else 1
        params = zo.round_robin_bit16_groups[i]
        offsets = zo.round_robin_bit16_offsets[i]
        size = part.numel()
        lo, hi = rank * size, (rank + 1) * size

        def sliced(key: str | None) -> torch.Tensor:
            flat = torch.zeros(size * world, dtype=part.dtype)
            for p, off in zip(params, offsets):
                src = p.detach() if key is None else state[f"{names[id(p)]}.{key}"]
                flat[off:off + p.numel()] = src.reshape(-1).to(part.dtype)
            return flat[lo:hi].to(part.device)

        part.data.copy_(sliced(None))
        first = names[id(params[0])]
        if f"{first}.exp_avg" in state:
            st = zo.optimizer.state.setdefault(part, {})
            st["exp_avg"] = sliced("exp_avg")
            st["exp_avg_sq"] = sliced("exp_avg_sq")
            st["step"] = state[f"{first}.step"].clone()


# -- per-rank runtime memory (the KV ledger carries predictions from one batch to the next) ----
def gather_ledgers(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Every rank's ledger ids and write count (collective when distributed)."""
    led = getattr(model, "ledger", None)
    if led is None:
        return {}, []
    counts = [int(c) for c in _gather_json(int(led.count))]
    shapes = _gather_json(None if led.ids is None else list(led.ids.shape))
    if any(s is None for s in shapes) or any(s != shapes[0] for s in shapes):
        return {}, [0] * len(counts)  # an empty (or ragged) ledger restarts empty
    ids = led.ids.detach().cpu().contiguous()
    if len(counts) > 1:
        outs = [torch.zeros_like(ids) for _ in counts]
        dist.all_gather(outs, ids)
    else:
        outs = [ids]
    return {f"ledger.ids.rank{r}": t for r, t in enumerate(outs)}, counts


def load_ledger(model: torch.nn.Module, tensors: dict[str, torch.Tensor], counts: list[int],
                rank: int, world: int) -> None:
    """Same world size: each rank its own ledger back. Otherwise the ledger restarts empty
    (its rows belonged to other ranks' batches; documented as not bit-exact)."""
    led = getattr(model, "ledger", None)
    if led is None:
        return
    led.reset()
    key = f"ledger.ids.rank{rank}"
    if len(counts) == world and key in tensors:
        led.ids = tensors[key].clone().to(next(model.parameters()).device)
        led.count = counts[rank]


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def gather_divergent(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Entries of a (whole) state_dict that differ between ranks, one copy per rank, and their
    keys. Collective when distributed; empty on one rank."""
    if not _dist_on() or dist.get_world_size() == 1:
        return {}, []
    digests = _gather_json({k: _digest(v) for k, v in state.items()})
    keys = sorted(k for k in state if any(d[k] != digests[0][k] for d in digests))
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        local = state[k].detach().contiguous()
        raw = local.reshape(-1).view(torch.uint8)  # as bytes: gloo lacks some int dtypes
        outs = [torch.zeros_like(raw) for _ in digests]
        dist.all_gather(outs, raw)
        out.update({f"rank{r}/{k}": t.view(local.dtype).reshape(local.shape).cpu()
                    for r, t in enumerate(outs)})
    return out, keys


def rank_state(index: dict[str, Any], model_state: dict[str, torch.Tensor],
               runtime: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The state_dict this rank loads: rank 0's, with this rank's own copy of each divergent
    entry when the world size is the one saved (at another world size rank 0's copies serve)."""
    out = dict(model_state)
    if index["world"] == world:
        for k in index.get("rank_keys", []):
            out[k] = runtime[f"rank{rank}/{k}"]
    return out


# -- writing -------------------------------------------------------------------------------------
def save_checkpoint(save_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    float_state: dict[str, torch.Tensor], meta: dict[str, Any],
                    runtime_state: dict[str, torch.Tensor] | None = None,
                    keep_last: int = 3, rank: int = 0) -> Path | None:
    """Rank 0 writes one checkpoint atomically and prunes to the last `keep_last`; other ranks
    return None. `model_state` / `float_state` must be whole (gathered) already."""
    root = Path(save_dir)
    final = root / step_dir_name(step)
    if rank != 0:
        return None
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a crashed save: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}
    for name, tensors in ((MODEL_FILE, model_state), (OPTIM_FILE, float_state),
                          (RUNTIME_FILE, runtime_state or {})):
        path = tmp / name
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
        fsync_file(path)
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    index = {"format": FORMAT, "version": VERSION, "step": step, **_jsonable(meta), "files": files}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    fsync_file(tmp / INDEX)
    fsync_dir(tmp)
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
    return index


def verify_files(ckpt: Path, index: dict[str, Any]) -> None:
    """Every listed file is there, whole (size) and unchanged (sha256)."""
    for name, info in index["files"].items():
        path = ckpt / name
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
    """Refuse an index whose run this one cannot continue. dp and zero_stage may differ."""
    where = ckpt / INDEX
    if index["preset"] != plan.preset:
        raise CheckpointError(f"{where}: written for preset {index['preset']!r}, this run uses "
                              f"{plan.preset!r}")
    cfg = _jsonable(config)
    if index["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(index["config"])
                      if cfg.get(k) != index["config"].get(k))
        raise CheckpointError(f"{where}: model config differs from this run's in {diff}")
    saved = index["plan"]
    for key, mine in (("tp", plan.layout.tp), ("ep", plan.layout.ep)):
        if saved["layout"][key] != mine:
            raise CheckpointError(f"{where}: incompatible plan: saved layout.{key}="
                                  f"{saved['layout'][key]}, this plan has {mine} (resharding across "
                                  "tp/ep is not implemented)")
    gb = saved["micro_batch"] * saved["grad_accum"] * saved["layout"]["dp"]
    for key, theirs, mine in (("seq_len", saved["seq_len"], plan.seq_len),
                              ("global batch", gb, plan.global_batch),
                              ("seed", index["seed"], seed)):
        if theirs != mine:
            raise CheckpointError(f"{where}: incompatible plan: saved {key}={theirs}, this run "
                                  f"has {mine} (the data order would differ)")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None


def check_shapes(path: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for k, v in want.items():
        if got[k].shape != v.shape or got[k].dtype != v.dtype:
            raise CheckpointError(f"{path}: {k} is {tuple(got[k].shape)} {got[k].dtype}, the "
                                  f"model has {tuple(v.shape)} {v.dtype}")


def read_checkpoint(spec: str | Path, *, plan: Any, config: Any, seed: int,
                    model_state: dict[str, torch.Tensor], save_dir: str | Path | None = None
                    ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor],
                           dict[str, torch.Tensor]]:
    """Resolve, verify and read a checkpoint; raises CheckpointError before touching any run
    state. `model_state` is the (whole) state_dict of the model it will be loaded into."""
    ckpt = resolve(spec, save_dir)
    index = read_index(ckpt)
    verify_files(ckpt, index)
    check_compatible(ckpt, index, plan=plan, config=config, seed=seed)
    tensors = _load_tensors(ckpt / MODEL_FILE)
    check_shapes(ckpt / MODEL_FILE, tensors, model_state)
    return ckpt, index, tensors, _load_tensors(ckpt / OPTIM_FILE), _load_tensors(ckpt / RUNTIME_FILE)
