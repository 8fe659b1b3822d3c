"""Count the collectives of a training step, by kind and by call site (issue 11: weak scaling).

    torchrun --standalone --nproc_per_node 2 bench/comm_profile.py --plan shard_plans/cpu-2.yaml \
        --steps 4 [--json out.json]        (any trainer flag works; --profile-steps picks the steps)

Wraps the torch.distributed collectives before the trainer starts, runs it, and prints (rank 0)
per profiled step: calls, bytes and host seconds per collective kind, and the arbd call sites
(first frame inside arbd/) that issue them. On CUDA ranks, host->device syncs are counted too
(`torch.cuda.set_sync_debug_mode`). Calls, not bytes, set the cost of a small host-bound step:
each collective costs tens of microseconds of latency, and each sync stops the host from running
ahead of the GPU.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

KINDS = ("all_reduce", "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor",
         "reduce_scatter_tensor", "reduce_scatter", "broadcast", "barrier", "all_gather_object",
         "broadcast_object_list", "gather", "scatter", "reduce")
ROOT = str(Path(__file__).resolve().parents[1] / "arbd")


class Counter:
    def __init__(self) -> None:
        self.on = False
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.secs: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.site_bytes: collections.Counter = collections.Counter()

    def reset(self) -> None:
        self.__init__()

    def record(self, kind: str, args: tuple, kwargs: dict, secs: float) -> None:
        if not self.on:
            return
        n = 0
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
        self.calls[kind] += 1
        self.bytes[kind] += n
        self.secs[kind] += secs
        site = (kind, _site())
        self.sites[site] += 1
        self.site_bytes[site] += n


def _site(callers: int = 0) -> str:
    """The innermost frame inside arbd/ (and `callers` arbd frames above it, joined by '<')."""
    stack = [f for f in reversed(traceback.extract_stack()[:-3]) if f.filename.startswith(ROOT)]
    if stack:
        return " < ".join(f"{Path(f.filename).relative_to(Path(ROOT).parent)}:{f.lineno} {f.name}"
                          for f in stack[:callers + 1])
    for f in reversed(traceback.extract_stack()[:-3]):
        if "deepspeed" in f.filename:
            return f"deepspeed/{Path(f.filename).name}:{f.lineno} {f.name}"
    return "other"


COUNTER = Counter()


def _wrap(kind: str):
    fn = getattr(dist, kind)

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        COUNTER.record(kind, args, kwargs, time.perf_counter() - t0)
        return out

    wrapped.__wrapped__ = fn
    return wrapped


def install() -> None:
    """Patch torch.distributed and every module that imported a collective by name."""
    originals = {k: getattr(dist, k) for k in KINDS if hasattr(dist, k)}
    for k in originals:
        setattr(dist, k, _wrap(k))
    for mod in list(sys.modules.values()):
        for k, fn in originals.items():
            if mod is not dist and getattr(mod, k, None) is fn:
                setattr(mod, k, getattr(dist, k))


def main() -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--profile-steps", default="", help="comma list (default: every step after the first)")
    p.add_argument("--json", default=None)
    p.add_argument("--cprofile", action="store_true",
                   help="also cProfile the last profiled step on rank 0 (top functions by cumulative time)")
    p.add_argument("--rows", type=int, default=40)
    ours, rest = p.parse_known_args()
    install()
    from arbd.train import trainer as tr

    args = tr.build_parser("comm profile").parse_args(rest)
    t = tr.Trainer(args)
    install()  # modules imported by the trainer (deepspeed's comm wrappers) too
    # --cprofile takes one more step after the counted ones, counted by nothing else: the
    # counters' stack walks would otherwise show up in its profile.
    steps = args.steps + (1 if ours.cprofile else 0)
    want = {int(s) for s in ours.profile_steps.split(",") if s} or set(range(2, args.steps + 1))
    cuda = t.device.type == "cuda"
    rows = []
    for step in range(1, steps + 1):
        COUNTER.reset()
        COUNTER.on = step in want and step <= args.steps
        syncs = 0
        prof = None
        if ours.cprofile and t.rank == 0 and step == steps:
            prof = cProfile.Profile()
            prof.enable()
        sync_sites: collections.Counter = collections.Counter()
        if cuda and COUNTER.on:
            torch.cuda.synchronize()

            def on_warning(message, category, filename, lineno, file=None, line=None):
                # Called while the syncing op is still on the stack: attribute it to its arbd caller.
                if "synchroniz" in str(message):
                    sync_sites[_site(callers=1)] += 1

            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = on_warning
                rec = t.train_step()
            torch.cuda.set_sync_debug_mode(0)
            syncs = sum(sync_sites.values())
        else:
            rec = t.train_step()
        if prof is not None:
            prof.disable()
            for order in ("cumulative", "tottime"):   # where the time is spent, and by whom
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(ours.rows)
                print(f"-- step {step} under cProfile (rank 0, {rec['step_s']:.3f} s), by {order}")
                print("\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()))
        if COUNTER.on:
            rows.append({"step": step, "step_s": rec["step_s"], "loss": rec["loss"], "syncs": syncs,
                         "calls": dict(COUNTER.calls), "bytes": dict(COUNTER.bytes),
                         "secs": dict(COUNTER.secs),
                         "sync_sites": dict(sync_sites.most_common()),
                         "sites": {f"{k} @ {s}": [n, COUNTER.site_bytes[(k, s)]]
                                   for (k, s), n in COUNTER.sites.most_common()}})
    if t.rank == 0:
        r = rows[-1]
        print(f"world {t.world}, plan {t.plan.name}: step {r['step']} {r['step_s']:.3f} s, "
              f"host->device syncs {r['syncs']}")
        print(f"{'collective':26s} {'calls':>6s} {'MB':>9s} {'host s':>8s}")
        for k in sorted(r["calls"], key=lambda k: -r["calls"][k]):
            print(f"{k:26s} {r['calls'][k]:6d} {r['bytes'][k] / 1e6:9.3f} {r['secs'][k]:8.3f}")
        print(f"{'total':26s} {sum(r['calls'].values()):6d} {sum(r['bytes'].values()) / 1e6:9.3f} "
              f"{sum(r['secs'].values()):8.3f}")
        print("call sites:")
        print(f"  {'calls':>5s} {'MB':>9s}  site")
        for s, (n, b) in r["sites"].items():
            print(f"  {n:5d} {b / 1e6:9.3f}  {s}")
        if r["sync_sites"]:
            print("host->device syncs by site (innermost arbd frame < its arbd caller):")
            for s, n in r["sync_sites"].items():
                print(f"  {n:5d}  {s}")
        if ours.json:
            Path(ours.json).write_text(json.dumps(rows, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
