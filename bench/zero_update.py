"""The ZeRO-partitioned ternary update on one GPU: the torch rule against the GPU kernels (issue 11).

    python3 bench/zero_update.py [--preset arb-small] [--steps 7] [--json out.json]

What a data-parallel rank does at every step boundary with `zero_stage >= 1`
(arbd/ternary/zero.py): take the step's summed float evidence of its row blocks and apply the
rule to them. Until the fused block path, that ran the torch rule matrix by matrix (quantise
with the rounding hash, apply the integer rule, repack) with three host readbacks per matrix;
the 2 x H200 profile (bench/RESULTS.md) showed 174 of a step's 314 synchronisations there.

One process (world 1, so each block is the whole matrix and the exchange moves nothing); every
partitioned matrix of the preset gets random bf16 evidence (the wire dtype), then
ZeroPartitioner's exchange + update_matrices run under each variant, interleaved, timed with a
synchronisation before and after (CUDA events would miss the host side, which is the point):

- torch:   state.DENSE_UPDATE_KERNEL = ROW_UPDATE_KERNEL = "torch" (the previous block path);
- kernels: "auto" (fused dense update per column-count group, counts read once).

Both variants start from the same state with the same evidence on the first step, and their
states must then be equal byte for byte (checked). Host syncs per update are counted with
torch.cuda.set_sync_debug_mode. Appends nothing itself: RESULTS.md gets the printed table.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.model.arb import ARBModel  # noqa: E402
from arbd.parallel.planner import training_config  # noqa: E402
from arbd.ternary import state  # noqa: E402
from arbd.ternary.rule import preset_rule  # noqa: E402
from arbd.ternary.update import ternary_matrices  # noqa: E402
from arbd.ternary.zero import ZeroPartitioner  # noqa: E402

VARIANTS = {"torch": "torch", "kernels": "auto"}


def _evidence(zp: ZeroPartitioner, seed: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(p.matrix.rows, p.matrix.cols, generator=g, device=device,
                        dtype=torch.float32).mul_(1e-4).to(torch.bfloat16) for p in zp.parts]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _update(model, zp: ZeroPartitioner, grads: list[torch.Tensor], rule, kernel: str) -> tuple[float, int, dict]:
    state.DENSE_UPDATE_KERNEL = state.ROW_UPDATE_KERNEL = kernel
    for p, g in zip(zp.parts, grads):
        p.matrix.add_grad(g)
    mats = ternary_matrices(model)
    cuda = torch.cuda.is_available()
    _sync()
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        zp(mats)
        counts = zp.update_matrices(mats, rule)
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
    _sync()
    secs = time.perf_counter() - t0
    syncs = sum("synchroniz" in str(x.message) for x in w)
    return secs, syncs, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="arb-small")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":   # a smoke run: the kernels through TRITON_INTERPRET=1, times meaningless
        VARIANTS["kernels"] = "triton"
    cfg = training_config(args.preset)
    models, zps = {}, {}
    base = ARBModel(cfg, backend="triton" if device == "cuda" else "torch", seed=0, device=device)
    # Accumulators spread over (-threshold, threshold), as after some training, so that trits
    # flip from the first update on and the comparison covers the repacking too.
    rule = preset_rule(args.preset)
    g = torch.Generator().manual_seed(1)
    for _, m in ternary_matrices(base):
        m.t_accum.copy_(torch.randint(1 - rule.threshold, rule.threshold, tuple(m.t_accum.shape),
                                      generator=g, dtype=torch.int8))
    for name in VARIANTS:
        models[name] = copy.deepcopy(base)
        zps[name] = ZeroPartitioner(models[name], None, "summed", dtype=torch.bfloat16)
    del base
    weights = sum(p.matrix.rows * p.matrix.cols for p in zps["torch"].parts)
    print(f"{args.preset}: {len(zps['torch'].parts)} partitioned matrices, {weights / 1e6:.1f}M weights")
    rows = {name: [] for name in VARIANTS}
    for step in range(args.steps):
        grads = _evidence(zps["torch"], step, device)
        for name, kernel in VARIANTS.items():
            r = _update(models[name], zps[name], grads, rule, kernel)
            rows[name].append(r)
        # same state, same evidence: the two paths must agree byte for byte after every step
        a, b = models["torch"].state_dict(), models["kernels"].state_dict()
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        if bad or rows["torch"][-1][2] != rows["kernels"][-1][2]:
            raise SystemExit(f"step {step + 1}: the kernel path differs from the torch rule: "
                             f"{bad[:5]}, counts {rows['torch'][-1][2]} vs {rows['kernels'][-1][2]}")
        print(f"step {step + 1}: states equal byte for byte, counts {rows['torch'][-1][2]}")
    out = {}
    for name in VARIANTS:
        t = [r[0] for r in rows[name][1:]]   # step 1 compiles
        out[name] = {"median_s": statistics.median(t), "min_s": min(t), "syncs": rows[name][-1][1]}
    ratio = out["torch"]["median_s"] / out["kernels"]["median_s"]
    print(f"{'variant':8s} {'median ms':>10s} {'min ms':>8s} {'syncs':>6s}")
    for name, o in out.items():
        print(f"{name:8s} {o['median_s'] * 1e3:10.1f} {o['min_s'] * 1e3:8.1f} {o['syncs']:6d}")
    print(f"torch / kernels: {ratio:.2f}x "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU, interpreted kernels'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "weights": weights,
                                               "variants": out, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
