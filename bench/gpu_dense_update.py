"""The dense ternary update on the GPU: the torch rule against the fused Triton path.

    python bench/gpu_dense_update.py --json runs/gpu_dense_update.json [--model arb-small]

For arb-small-like matrices with fp32 evidence, `TernaryMatrix.apply_update` runs with
state.DENSE_UPDATE_KERNEL = "torch" and = "triton" from the same start.
Check: three successive updates (new evidence and salt each), then the number of bytes that
differ between the two paths in packed / t_accum / exponent / e_accum, and the flip and
scale-move counts of every step (goal: 0 bytes, equal counts).
Time: median of CUDA-event timings of apply_update alone (evidence set before each, outside the
timed region; the call ends with the host reading the counts, as the training step does), and of
the fused kernels alone. GB/s is counted on the fewest
bytes the update must move: fp32 evidence read (4 B per weight), packed trits read and written
(0.4 B), trit accumulators read and written (2 B), i.e. 6.4 B per weight; a device-to-device
copy measured in the same run gives the ceiling.

--model PRESET: every TernaryMatrix of that preset's model on the GPU, each with random fp32
evidence, updated (a) together by update.apply_updates (the fused kernels, one group per column
count), (b) one matrix at a time (apply_update, the same kernels, launched per matrix), (c) by the
torch rule; wall time per whole-model update with one count read-back, and whether (a) and (b)
leave every state byte equal to (c).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from arbd.ternary import state  # noqa: E402
from arbd.ternary.rule import TUNED_RULE, TernaryRule  # noqa: E402
from arbd.ternary.state import TernaryMatrix  # noqa: E402
from arbd.ternary.triton_update import dense_update  # noqa: E402
from arbd.ternary.update import apply_updates, ternary_matrices  # noqa: E402
from bench.gpu_update import copy_bandwidth, event_median_ms  # noqa: E402

SHAPES = [(1024, 4096), (4096, 1024), (7168, 7168), (2048, 1)]
BYTES_PER_WEIGHT = 4 + 2 * 0.2 + 2 * 1


def make(shape, seed: int) -> TernaryMatrix:
    gen = torch.Generator().manual_seed(seed)
    m = TernaryMatrix(*shape, generator=gen)
    m.t_accum.copy_(torch.randint(-30, 31, m.t_accum.shape, generator=gen).to(torch.int8))
    m.exponent.copy_(torch.randint(-60, 20, (shape[0],), generator=gen).to(torch.int8))
    m.e_accum.copy_(torch.randint(-10, 11, (shape[0],), generator=gen).to(torch.int8))
    return m.cuda()


def grads(shape, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        g = torch.randn(*shape, generator=gen, device="cuda") * 1e-4
        out.append(torch.where(g == 0, torch.full_like(g, 1e-7), g))
    return out


def run_path(base: TernaryMatrix, gs, rule: TernaryRule, mode: str):
    state.DENSE_UPDATE_KERNEL = mode
    m = copy.deepcopy(base)
    stats = []
    for step, g in enumerate(gs):
        m._grad = g.clone()
        stats.append(m.apply_update(replace(rule, salt=step + 1)))
    state.DENSE_UPDATE_KERNEL = "auto"
    return m, stats


def check(shape, rule: TernaryRule, seed: int) -> dict:
    base, gs = make(shape, seed), grads(shape, 3, seed)
    ref, want = run_path(base, gs, rule, "torch")
    out, got = run_path(base, gs, rule, "triton")
    diff = {n: int((getattr(ref, n) != getattr(out, n)).sum())
            for n in ("packed", "t_accum", "exponent", "e_accum")}
    return {"differing_bytes": diff, "counts_equal": want == got,
            "flips": [s["trit_flips"] for s in want], "moves": [s["scale_moves"] for s in want]}


def time_shape(shape, rule: TernaryRule, reps: int) -> dict:
    m = make(shape, 1)
    g = grads(shape, 1, 2)[0]
    res = {}
    for mode in ("torch", "triton"):
        state.DENSE_UPDATE_KERNEL = mode
        res[f"{mode}_ms"] = event_median_ms(lambda: m.apply_update(rule), reps,
                                            before=lambda: setattr(m, "_grad", g), warmup=3)
    state.DENSE_UPDATE_KERNEL = "auto"
    res["fused_kernels_ms"] = event_median_ms(
        lambda: dense_update(m.packed, m.t_accum, m.exponent, m.e_accum, g, rule), reps, warmup=3)
    n = shape[0] * shape[1]
    # tile sweep of the fused path (both kernels), GPU time per call
    from arbd.ternary import triton_update as tu
    default = (tu.TILE_BYTES, tu.TILE_MAX_B)
    res["tiles_ms"] = {}
    sweep = [(256, 256), (512, 512), (128, 128), (512, 256), (1024, 64)]
    for tb, mb in sweep if shape == (7168, 7168) else []:
        tu.TILE_BYTES, tu.TILE_MAX_B = tb, mb
        res["tiles_ms"][f"{tb}/{mb}"] = event_median_ms(
            lambda: dense_update(m.packed, m.t_accum, m.exponent, m.e_accum, g, rule), reps, warmup=3)
    tu.TILE_BYTES, tu.TILE_MAX_B = default
    for k in ("torch", "triton"):
        res[f"{k}_GBps"] = n * BYTES_PER_WEIGHT / (res[f"{k}_ms"] / 1e3) / 1e9
    return res


def model_update(preset: str, rule: TernaryRule, reps: int) -> dict:
    """Whole-model update three ways (module docstring); ms per update, host wall time."""
    import time

    from arbd.model.arb import ARBModel
    from arbd.parallel import planner
    model = ARBModel(planner.training_config(preset), backend="triton", seed=0, device="cuda")
    mats = ternary_matrices(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    gs = [torch.randn(m.rows, m.cols, generator=gen, device="cuda") * 1e-4 for _, m in mats]
    start = copy.deepcopy([m.state_dict() for _, m in mats])

    def per_matrix(ms, r):
        counts = [m.apply_update(r, counts_on_device=True) for _, m in ms]
        dev = [c["counts"] for c in counts if "counts" in c]
        return torch.stack(dev).sum(0).tolist() if dev else None

    ways = {"grouped": ("triton", apply_updates), "per_matrix": ("triton", per_matrix),
            "torch": ("torch", lambda ms, r: [m.apply_update(r) for _, m in ms])}
    res, finals = {"matrices": len(mats), "weights": sum(m.rows * m.cols for _, m in mats)}, {}
    for name, (mode, fn) in ways.items():
        state.DENSE_UPDATE_KERNEL = mode
        times = []
        for step in range(reps + 2):
            if step == 2:   # the first two compile and warm the allocator
                for (_, m), sd in zip(mats, start):
                    m.load_state_dict(sd)
            for (_, m), g in zip(mats, gs):
                m._grad = g.clone()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(mats, replace(rule, salt=step))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        finals[name] = [copy.deepcopy(m.state_dict()) for _, m in mats]
        for (_, m), sd in zip(mats, start):
            m.load_state_dict(sd)
        res[f"{name}_ms"] = sorted(times[2:])[len(times[2:]) // 2] * 1e3
    state.DENSE_UPDATE_KERNEL = "auto"
    for name in ("grouped", "per_matrix"):
        res[f"{name}_differing_bytes"] = sum(int((a[k] != b[k]).sum()) for a, b in zip(
            finals[name], finals["torch"]) for k in a)
    res.update(preset=preset, reps=reps)
    return res


def report_lines(out: dict) -> list[str]:
    """The markdown table of main's JSON (one row per matrix shape), then the whole-model line
    if it timed a model; bench/gpu_report.py prints the same lines from the JSON."""
    lines = ["| matrix (fp32 evidence) | torch ms | fused ms | speed-up | torch GB/s | fused GB/s "
             "| fused kernels alone ms | differing bytes (3 rules x 3 steps) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, t in out["timings"].items():
        nd = sum(sum(c["differing_bytes"].values()) for k, c in out["checks"].items()
                 if k.startswith(key + "/"))
        ok = all(c["counts_equal"] for k, c in out["checks"].items() if k.startswith(key + "/"))
        lines.append(f"| {key} | {t['torch_ms']:.3f} | {t['triton_ms']:.3f} | "
                     f"{t['torch_ms'] / t['triton_ms']:.1f}x | {t['torch_GBps']:.0f} | "
                     f"{t['triton_GBps']:.0f} | {t['fused_kernels_ms']:.3f} | "
                     f"{nd}{'' if ok else ' (counts differ)'} |")
    res = out.get("model")
    if res:
        lines += ["", f"{res.get('preset', 'model')}: {res['matrices']} matrices, {res['weights']:,} weights; "
                  f"whole-model update (median of {res.get('reps', '?')}, host wall, ends with the count "
                  f"read-back): grouped {res['grouped_ms']:.2f} ms, per matrix "
                  f"{res['per_matrix_ms']:.2f} ms, torch rule {res['torch_ms']:.2f} ms; grouped "
                  f"{res['per_matrix_ms'] / res['grouped_ms']:.1f}x per-matrix, "
                  f"{res['torch_ms'] / res['grouped_ms']:.1f}x torch; bytes differing from torch: "
                  f"grouped {res['grouped_differing_bytes']}, per matrix "
                  f"{res['per_matrix_differing_bytes']}"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--model", default=None, help="also time a whole model's update (a preset)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth() / 1e9,
           "checks": {}, "timings": {}}
    rules = {"tuned": TUNED_RULE, "default_nearest": TernaryRule(),
             "no_scales": replace(TUNED_RULE, learn_scales=False)}
    for shape in SHAPES:
        key = f"{shape[0]}x{shape[1]}"
        for rname, rule in rules.items():
            out["checks"][f"{key}/{rname}"] = c = check(shape, rule, seed=shape[0] + shape[1])
            print(key, rname, c, flush=True)
        out["timings"][key] = t = time_shape(shape, TUNED_RULE, args.reps)
        print(key, t, flush=True)
    if args.model:
        out["model"] = model_update(args.model, TUNED_RULE, args.reps)
    print(f"\ndevice: {out['device']}; device-to-device copy {out['copy_GBps']:.0f} GB/s")
    print("\n".join(report_lines(out)))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
