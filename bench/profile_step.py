"""Where one training micro-batch's time goes on the GPU (issue 10): arb-small forward + backward
(+ the ternary update once), after warm-up.

    python3 bench/profile_step.py [--preset arb-small] [--micro-batch 8] [--seq-len 1024]
        [--scaling 4,8,16] [--cprofile] [--torch-profile] [--activation-checkpointing] [--activation-offload]

Prints: wall time per micro-batch with one synchronisation at the end; with --scaling, tokens/s at
several micro-batch sizes (tokens/s that grows with the batch means the host, not the GPU, sets
the pace); with --cprofile, the Python functions that take the host's time (time spent blocked in
a device synchronisation shows up under the call that synchronised: .item(), .tolist(),
nonzero, int(tensor)); with --torch-profile, host and device totals, kernel launches and
synchronisations counted from the profiler's events, and the top operators.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.model.arb import ARBModel  # noqa: E402
from arbd.parallel import planner  # noqa: E402
from arbd.ternary.rule import preset_rule  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
ALLOC_EVENTS = ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost", "cudaMallocHost")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _print_stats(title: str, report, prof: cProfile.Profile) -> None:
    """report(stats) prints into a buffer; print it under title without blank lines."""
    buf = io.StringIO()
    report(pstats.Stats(prof, stream=buf))
    print(f"-- {title}\n" + "\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="arb-small")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--scaling", default="", help="comma-separated micro-batch sizes to time")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--torch-profile", action="store_true")
    p.add_argument("--profile-update", action="store_true", help="cProfile and torch-profile one ternary update")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--op-sites", default="",
                   help="comma-separated operator names (e.g. aten::copy_,aten::mul): their device "
                        "time in one micro-batch by call site in arbd/")
    p.add_argument("--sync-sites", action="store_true",
                   help="list where one micro-batch and one update wait on the GPU (call sites in arbd/)")
    p.add_argument("--callers", default="",
                   help="with --cprofile: regex of functions whose callers to list (e.g. 'torch.empty')")
    p.add_argument("--reps", type=int, default=3, help="micro-batches timed one by one")
    p.add_argument("--dense", action="store_true",
                   help="the dense bf16 twin (bench/dense_twin.py) instead; no ternary update")
    p.add_argument("--keep-decoded-weight", choices=["on", "off"], default=None,
                   help="arbd.ternary.ops.KEEP_DECODED_WEIGHT (default: the library's setting)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the model's regions in backward, as a plan with activation_checkpointing")
    p.add_argument("--activation-offload", action="store_true",
                   help="also keep the recomputed regions' inputs in pinned host memory (implies checkpointing)")
    a = p.parse_args()
    if a.keep_decoded_weight:
        from arbd.ternary import ops
        ops.KEEP_DECODED_WEIGHT = a.keep_decoded_weight == "on"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if dev.type == "cuda" else "torch"
    model = ARBModel(planner.training_config(a.preset), backend=backend, seed=0, device=dev)
    model.ternary_rule = preset_rule(a.preset)
    model.activation_checkpointing = a.activation_checkpointing or a.activation_offload
    model.activation_offload = a.activation_offload
    if a.dense:
        from bench.dense_twin import densify
        densify(model)
        model.to(device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def micro(batch: int) -> None:
        ids = torch.randint(0, 256, (batch, a.seq_len + 1), generator=g).to(dev)
        out = model(ids, dtype=dtype)
        out.loss.backward()

    def update() -> None:
        if a.dense:   # the twin's optimizer step is not profiled here: drop the gradients
            model.zero_grad(set_to_none=True)
            return
        model._ternary_update_memory(loss_signal=torch.ones((), device=dev))

    for _ in range(2):
        micro(a.micro_batch)
        update()
    _sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reps = a.reps
    times = []
    for _ in range(reps):   # each synchronised: the spread between micro-batches is printed too
        t0 = time.perf_counter()
        micro(a.micro_batch)
        _sync()
        times.append(time.perf_counter() - t0)
    mb_s = sum(times) / reps
    times.sort()
    upd = []
    for _ in range(reps):   # each update after a micro-batch's evidence, timed alone
        update()
        micro(a.micro_batch)
        _sync()
        t0 = time.perf_counter()
        update()
        _sync()
        upd.append(time.perf_counter() - t0)
    print(f"micro-batch {a.micro_batch} x {a.seq_len}: forward+backward {mb_s * 1e3:.1f} ms "
          f"({a.micro_batch * a.seq_len / mb_s:,.0f} tokens/s; min {times[0] * 1e3:.1f}, median "
          f"{times[reps // 2] * 1e3:.1f}, max {times[-1] * 1e3:.1f} ms over {reps}; peak "
          f"{torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.2f} GiB); update "
          + " / ".join(f"{u * 1e3:.1f}" for u in upd) + " ms")

    for b in [int(x) for x in a.scaling.split(",") if x]:
        for _ in range(3):   # new shapes compile Triton variants: keep that out of the timing
            micro(b)
        _sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            micro(b)
        _sync()
        s = (time.perf_counter() - t0) / reps
        print(f"scaling: micro-batch {b}: {s * 1e3:.1f} ms, {b * a.seq_len / s:,.0f} tokens/s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.2f} GiB")
        update()

    def profiled(fn, title: str) -> cProfile.Profile:
        """Run fn (synchronised) under cProfile; print its top functions by self and total time."""
        _sync()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        fn()
        _sync()
        prof.disable()
        print(f"-- {title} under cProfile: {(time.perf_counter() - t0) * 1e3:.1f} ms")
        for key in ("tottime", "cumulative"):
            _print_stats(f"{title}, by {key}", lambda st: st.sort_stats(key).print_stats(a.rows), prof)
        return prof

    if a.cprofile:
        prof = profiled(lambda: micro(a.micro_batch), "one micro-batch")
        _print_stats("callers of synchronising calls", lambda st: st.sort_stats("tottime").print_callers(
            r"item|tolist|nonzero|__bool__|__int__|_local_scalar|cpu|unique"), prof)
        if a.callers:
            _print_stats(f"callers of {a.callers}",
                         lambda st: st.sort_stats("tottime").print_callers(a.callers), prof)

    def torch_profiled(fn, title: str) -> None:
        """Run fn (synchronised) under torch.profiler; print host and kernel totals, launches,
        synchronisations and the top operators."""
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        _sync()
        with torch.profiler.profile(activities=acts) as prof:
            fn()
            _sync()
        ev = prof.key_averages()
        dev_t = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
        count = lambda names: sum(e.count for e in ev if e.key in names)  # noqa: E731
        # Kernels only: an operator's row repeats the device time of the kernels it launched.
        kernels = [e for e in ev if str(getattr(e, "device_type", "")).endswith("CUDA")]
        print(f"profiled {title}: host {sum(e.self_cpu_time_total for e in ev) / 1e3:.1f} ms, "
              f"kernels {sum(dev_t(e) for e in kernels) / 1e3:.1f} ms (profiler on); "
              f"launches {count(LAUNCH_EVENTS)}, synchronisations {count(SYNC_EVENTS)}, "
              f"device-to-host copies {sum(e.count for e in ev if 'DtoH' in e.key or 'Device -> Pageable' in e.key)}; "
              + ", ".join(f"{e.key} {e.count} ({e.self_cpu_time_total / 1e3:.1f} ms)"
                          for e in ev if e.key in ALLOC_EVENTS))
        for how, key in (("by device time", dev_t), ("by host time", lambda e: e.self_cpu_time_total)):
            print(f"-- {title}, top {a.rows} {how}: name | host ms | device ms | calls")
            for e in sorted(ev, key=key, reverse=True)[:a.rows]:
                print(f"{e.key[:70]} | {e.self_cpu_time_total / 1e3:.2f} | {dev_t(e) / 1e3:.2f} | {e.count}")

    if a.profile_update:
        micro(a.micro_batch)
        profiled(update, "one update")
        micro(a.micro_batch)
        torch_profiled(update, "update")

    if a.torch_profile:
        torch_profiled(lambda: micro(a.micro_batch), "micro-batch")

    if a.op_sites and dev.type == "cuda":
        op_sites(lambda: micro(a.micro_batch), a.op_sites.split(","), a.rows)

    if a.sync_sites and dev.type == "cuda":
        for title, fn in (("micro-batch", lambda: micro(a.micro_batch)), ("update", update)):
            sites = sync_sites(fn)
            print(f"-- {title}: {sum(sites.values())} host waits on the GPU, by call site")
            for site, n in sites.most_common(a.rows):
                print(f"{n:5d}  {site}")


def op_sites(fn, names: list[str], rows: int) -> None:
    """Device time of the named operators in fn, grouped by their innermost arbd/ frames (forward
    ops; backward ops show the autograd engine, grouped by input shapes instead)."""
    _sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA],
                                with_stack=True, record_shapes=True) as prof:
        fn()
        _sync()
    dev_t = lambda e: e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total  # noqa: E731
    for name in names:
        by_site: dict[str, list[float]] = {}
        for e in prof.events():
            if e.name != name:
                continue
            # The Python frames are the op's ancestors in the event tree ("path.py(line): fn").
            frames, p = [], e.cpu_parent
            while p is not None and len(frames) < 2:
                if "arbd/" in p.name and ".py(" in p.name:
                    frames.append(p.name[p.name.index("arbd/"):])
                p = p.cpu_parent
            site = " <- ".join(frames) or \
                f"(no arbd frame) shapes {e.input_shapes}"
            t = by_site.setdefault(site, [0.0, 0])
            t[0] += dev_t(e)
            t[1] += 1
        total = sum(v[0] for v in by_site.values())
        print(f"-- {name}: {total / 1e3:.2f} ms device over {sum(v[1] for v in by_site.values())} calls, by site")
        for site, (t, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"{t / 1e3:8.2f} ms {n:5d}  {site[:200]}")


def sync_sites(fn) -> "collections.Counter":
    """Run fn with torch's sync debug mode on; count each synchronising call by its innermost
    frame in arbd/ (or bench/) and the frame's caller, so that a helper shows who called it."""
    import collections
    import traceback
    import warnings

    root = str(Path(__file__).resolve().parents[1])
    sites: collections.Counter = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)
                  and "profile_step" not in f.filename]
        inner = frames[-2:] if frames else []
        sites[" <- ".join(f"{Path(f.filename).relative_to(root)}:{f.lineno} {f.name}"
                          for f in reversed(inner)) or "other"] += 1

    _sync()
    old = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    _sync()
    return sites

if __name__ == "__main__":
    main()
