"""Training-step throughput and memory: ternary ARB against a dense bf16 twin (issue 10).

    python bench/train_step_gpu.py ternary --plan shard_plans/h100-arb-small.yaml --json t.json
    python bench/train_step_gpu.py dense   --plan shard_plans/h100-arb-small.yaml --json d.json
    python bench/train_step_gpu.py ternary --plan shard_plans/h100-arb-3b.yaml --mem-cap-gib 24 \
        --evidence-probe --state --json b.json
    python bench/train_step_gpu.py report t.json d.json b.json

`bench/train_step_gpu.sh` runs all of it in one go (one process per model, so each peak is its own).

ternary: the plan's preset as launch/pretrain.py builds it (planner.training_config: the text
stack), backend triton on CUDA, the plan's rule (TUNED_RULE unless it says otherwise), TernaryOptimizer inside deepspeed.initialize with
the plan's DeepSpeed config; each micro-batch is Trainer.train_step's: engine forward (bf16),
record_loss, engine.backward, end_micro_batch, engine.step. Inputs are random bytes.
dense: the same model built the same way, then bench/dense_twin.densify (every ternary module
becomes a float module of the same shape, initialised from the decoded weights), trained by
DeepSpeed with torch Adam (fused on CUDA), ZeRO stage 1, bf16, the same batch shape and inputs.
KG edges observe the staged pairs at every boundary, as the ternary update's step hook does.

Tokens per step = micro_batch x grad_accum x seq_len (Trainer's count). Peak memory is
torch.cuda.max_memory_allocated over the timed steps (reset after the warm-up steps; the
persistent state, optimizer states included, is allocated by then).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from arbd.model.arb import ARBModel  # noqa: E402
from arbd.parallel import planner  # noqa: E402
from arbd.parallel.plan import Plan, load_plan  # noqa: E402
from arbd.ternary import ternary_state_bytes  # noqa: E402
from arbd.ternary.state import TernaryMatrix, set_evidence_dtype  # noqa: E402

GiB = 2**30
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def _alloc() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _plan(a: argparse.Namespace) -> Plan:
    plan = load_plan(a.plan)
    kw = {k: v for k, v in (("preset", a.preset), ("micro_batch", a.micro_batch),
                            ("grad_accum", a.grad_accum), ("seq_len", a.seq_len)) if v is not None}
    if a.activation_checkpointing != "plan":
        kw["activation_checkpointing"] = a.activation_checkpointing == "on"
        if a.activation_checkpointing == "off":
            kw["activation_offload"] = False
    if a.evidence_dtype:
        kw["evidence_dtype"] = a.evidence_dtype
    if a.activation_offload:
        kw["activation_checkpointing"] = kw["activation_offload"] = True
    # One process: dp 1, no ZeRO for the ternary side (the h100 plans say the same).
    return replace(plan, **kw)


def _start(a: argparse.Namespace):
    from arbd.train.distributed import init_distributed

    _, _, device = init_distributed()
    if a.mem_cap_gib and CUDA:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_cap_gib * GiB / total), device)
    return device


def _inputs(plan: Plan, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:  # drawn on the CPU and copied, like the trainer's loader batches
        yield torch.randint(0, 256, (plan.micro_batch, plan.seq_len + 1), generator=g).to(device)


def _build(plan: Plan, device, backend: str) -> ARBModel:
    cfg = planner.training_config(plan)   # == trainer.model_config with default flags
    torch.manual_seed(0)
    model = ARBModel(cfg, backend=backend, seed=0, device=device)
    model.ternary_rule = plan.ternary_rule()
    model.ternary_micro_batches = plan.grad_accum * plan.layout.dp
    model.activation_checkpointing = plan.activation_checkpointing
    model.activation_offload = plan.activation_offload
    set_evidence_dtype(model, plan.evidence_dtype)
    return model


def _run_steps(a, plan, micro_step, boundary_hook=None) -> dict:
    """Warm-up steps, then timed steps; each step = grad_accum micro-batches."""
    losses, ponder, step_s = [], [], []
    from arbd.train.trainer import GarbageCollection
    collector = GarbageCollection(getattr(a, "gc_every", 50))   # as the trainer does
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            _sync()
            _reset_peak()
        t0 = time.perf_counter()
        collector.step(step + 1)   # inside the timed step: the trainer's runs pay for it too
        for _ in range(plan.grad_accum):
            out = micro_step()
            losses.append(float(out.loss.detach()))
            if "ponder" in out.losses:
                ponder.append(float(out.losses["ponder"]))
            del out
        if boundary_hook is not None:
            boundary_hook()
        _sync()
        if step >= a.warmup:
            step_s.append(time.perf_counter() - t0)
    collector.close()
    peak = _peak()
    phases: dict[str, float] = {}
    if getattr(a, "phases", False):   # one more step, synchronised between phases (not timed above)
        for _ in range(plan.grad_accum):
            micro_step(phases)
        t0 = time.perf_counter()
        if boundary_hook is not None:
            boundary_hook()
        _sync()
        phases["boundary_hook"] = time.perf_counter() - t0
    if getattr(a, "cprofile", False):   # one more step under cProfile (printed, not timed above)
        import cProfile
        import pstats
        prof = cProfile.Profile()
        _sync()
        prof.enable()
        for _ in range(plan.grad_accum):
            micro_step()
        if boundary_hook is not None:
            boundary_hook()
        _sync()
        prof.disable()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof).sort_stats(key).print_stats(35)
    tokens = plan.micro_batch * plan.grad_accum * plan.seq_len
    mean = sum(step_s) / len(step_s)
    return {"step_s": step_s, "tokens_per_step": tokens, "tokens_per_s": tokens / mean,
            "peak_train_bytes": peak, "phases_one_step_s": phases, "loss_first": losses[0], "loss_last": losses[-1],
            "act_steps_mean": sum(ponder) / len(ponder) if ponder else None}


class _Phase:
    """Adds the synchronised time of a block to times[name] (no-op when times is None)."""

    def __init__(self, times: dict | None, name: str) -> None:
        self.times, self.name = times, name

    def __enter__(self):
        if self.times is not None:
            _sync()
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.times is not None:
            _sync()
            self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.t0


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps: its states and the tensors in its param groups
    (DeepSpeed's bf16 / ZeRO wrappers put fp32 masters there)."""
    seen, n = set(), 0
    tensors = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    tensors += [p for g in opt.param_groups for p in g["params"]]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def _basic_optimizer(engine_opt):
    """The torch optimizer under DeepSpeed's wrapper (BF16_Optimizer / ZeRO keep it as .optimizer)."""
    o = engine_opt
    while hasattr(o, "optimizer") and not isinstance(o, torch.optim.Optimizer):
        o = o.optimizer
    return o


# -- persistent state per ternary weight ----------------------------------------------------------
def state_breakdown(model: ARBModel, float_optimizer_bytes: int) -> dict:
    """Persistent bytes by component, and per logical ternary weight."""
    from arbd.model.kg_edges import KGEdges
    from arbd.vq.codebook import TernaryVQCodebook

    comp = {k: 0 for k in ("packed", "exponent", "t_accum", "e_accum", "codebook usage",
                           "KG edges", "float params + optimizer", "other buffers")}
    other: dict[str, int] = {}
    owner = {}
    for mname, mod in model.named_modules():
        for bname, b in mod.named_buffers(recurse=False):
            owner[f"{mname}.{bname}" if mname else bname] = (mod, bname, b)
    for full, (mod, bname, b) in owner.items():
        nbytes = b.numel() * b.element_size()
        if isinstance(mod, TernaryMatrix) and bname in ("packed", "exponent", "t_accum", "e_accum"):
            comp[bname] += nbytes
        elif isinstance(mod, TernaryVQCodebook) and bname == "usage":
            comp["codebook usage"] += nbytes
        elif isinstance(mod, KGEdges):
            comp["KG edges"] += nbytes
        else:
            comp["other buffers"] += nbytes
            other[full] = nbytes
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    comp["float params + optimizer"] = params + float_optimizer_bytes
    _, weights = ternary_state_bytes(model)
    total = sum(comp.values())
    return {"logical_ternary_weights": weights, "bytes": comp, "total_bytes": total,
            "B_per_weight": {k: v / weights for k, v in comp.items()},
            "total_B_per_weight": total / weights,
            "float_params": sum(p.numel() for p in model.parameters()),
            "other_buffers": dict(sorted(other.items(), key=lambda kv: -kv[1])[:8])}


# -- evidence-in-backward probe ---------------------------------------------------------------------
def evidence_probe(model: ARBModel, plan: Plan, inputs, dtype, reps: int = 2) -> dict:
    """Forward + backward of single micro-batches with and without the weight evidence
    (ops.weight_grad and the add to the float evidence buffers); the evidence is dropped after."""
    from arbd.ternary import ops
    from arbd.ternary.update import clear_evidence

    def run(tag: str) -> dict:
        fwd, bwd, peaks = [], [], []
        for _ in range(reps):
            clear_evidence(model)
            ids = next(inputs)
            _sync()
            _reset_peak()
            t0 = time.perf_counter()
            out = model(ids, dtype=dtype)
            _sync()
            t1 = time.perf_counter()
            out.loss.backward()
            _sync()
            t2 = time.perf_counter()
            peaks.append(_peak())
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            del out
        clear_evidence(model)
        if model.kg_edges is not None:
            model.kg_edges.clear_staged()
        for p in model.parameters():
            p.grad = None
        return {f"{tag}_forward_s": min(fwd), f"{tag}_backward_s": min(bwd),
                f"{tag}_peak_bytes": max(peaks)}

    res = run("with_evidence")
    saved = (ops.weight_grad, TernaryMatrix.add_grad, TernaryMatrix.add_row_grad,
             TernaryMatrix.add_grad_product)
    ops.weight_grad = lambda gy, x, backend="torch": None
    TernaryMatrix.add_grad = lambda self, grad: None
    TernaryMatrix.add_grad_product = lambda self, gy, x, backend="torch", bucket=True: None
    TernaryMatrix.add_row_grad = lambda self, idx, rows: None
    try:
        res.update(run("no_evidence"))
    finally:
        (ops.weight_grad, TernaryMatrix.add_grad, TernaryMatrix.add_row_grad,
         TernaryMatrix.add_grad_product) = saved
    return res


# -- the two trainings ------------------------------------------------------------------------------
def run_ternary(a: argparse.Namespace) -> dict:
    import deepspeed

    from arbd.parallel.mesh import Mesh
    from arbd.parallel.parallelize import parallelize
    from arbd.train.optim import TernaryOptimizer
    from arbd.train.schedule import warmup_cosine

    device = _start(a)
    plan = _plan(a)
    backend = a.backend or ("triton" if CUDA else "torch")
    t0 = time.perf_counter()
    model = _build(plan, device, backend)
    mesh = Mesh(plan.layout)
    parallelize(model, mesh)
    total_steps = a.warmup + a.steps
    opt = TernaryOptimizer([p for p in model.parameters() if p.requires_grad], model, lr=1e-3,
                           micro_batches=model.ternary_micro_batches,
                           rate_schedule=lambda s: warmup_cosine(s, total_steps, warmup=1))
    dtype = plan.torch_dtype
    engine, mode = None, "deepspeed engine (plan's config) + TernaryOptimizer"
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                               config=plan.deepspeed_config(), mpu=mesh)
    except Exception as e:  # stated in the result, never silently
        mode = f"no engine (deepspeed.initialize failed: {type(e).__name__}: {e})"
    if plan.activation_checkpointing:
        mode += ", activation checkpointing" + (" + offload" if plan.activation_offload else "")
    _sync()
    build_s = time.perf_counter() - t0
    persistent = _alloc()
    inputs = _inputs(plan, device)

    def micro(times=None):
        if engine is not None:
            with _Phase(times, "forward"):
                out = engine(next(inputs), dtype=dtype)
                opt.record_loss(out.loss)
            with _Phase(times, "backward"):
                engine.backward(out.loss)
                opt.end_micro_batch()
            with _Phase(times, "engine.step (update at the boundary)"):
                engine.step()
        else:
            out = model(next(inputs), dtype=dtype)
            opt.record_loss(out.loss)
            out.loss.backward()
            opt.end_micro_batch()
        return out

    def boundary():
        if engine is None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    res = {"model": "ternary", "mode": mode, "backend": backend, "build_s": build_s,
           "engine_optimizer": type(engine.optimizer).__name__ if engine is not None else None,
           "persistent_after_build_bytes": persistent}
    res.update(_run_steps(a, plan, micro, boundary))
    res["updates_applied"] = model.ternary_stats.applied
    res["trit_flips_last"] = model.ternary_stats.last.get("trit_flips", 0)
    if a.state:
        res["state"] = state_breakdown(model, _optimizer_bytes(_basic_optimizer(
            engine.optimizer if engine is not None else opt)))
    if a.evidence_probe:
        res["evidence_probe"] = evidence_probe(model, plan, inputs, dtype)
    return res


def run_dense(a: argparse.Namespace) -> dict:
    import deepspeed

    from bench.dense_twin import densify

    device = _start(a)
    plan = _plan(a)
    if a.activation_checkpointing == "plan":
        # The baseline is dense training as usually run: no recomputation unless asked for.
        plan = replace(plan, activation_checkpointing=False, activation_offload=False)
    t0 = time.perf_counter()
    model = _build(plan, device, "torch")   # ternary kernels unused: every ternary module is swapped
    swapped = densify(model)
    n_params = sum(p.numel() for p in model.parameters())
    adam = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=CUDA)
    cfg = {"train_batch_size": plan.micro_batch * plan.grad_accum,
           "train_micro_batch_size_per_gpu": plan.micro_batch,
           "gradient_accumulation_steps": plan.grad_accum, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": a.zero_stage}, "zero_allow_untested_optimizer": True,
           "bf16": {"enabled": True}, "wall_clock_breakdown": False, "steps_per_print": 10**9}
    engine, eopt, _, _ = deepspeed.initialize(model=model, optimizer=adam, config=cfg)
    _sync()
    build_s = time.perf_counter() - t0
    persistent = _alloc()
    inputs = _inputs(plan, device)
    losses_seen = []

    def micro(times=None):
        with _Phase(times, "forward"):
            out = engine(next(inputs), dtype=torch.bfloat16)
            losses_seen.append(float(out.loss.detach()))   # the host sync record_loss makes
        with _Phase(times, "backward"):
            engine.backward(out.loss)
        with _Phase(times, "engine.step (Adam at the boundary)"):
            engine.step()
        return out

    def boundary():
        if model.kg_edges is not None:   # what apply_ternary_update's step hook does
            model.kg_edges.on_ternary_step(True)

    res = {"model": "dense", "mode": f"deepspeed engine, torch Adam (fused={CUDA}), ZeRO stage "
           f"{a.zero_stage}, bf16" + (", activation checkpointing" if plan.activation_checkpointing else ""),
           "swapped_modules": swapped, "float_params": n_params,
           "param_dtype": str(next(model.parameters()).dtype), "build_s": build_s,
           "persistent_after_build_bytes": persistent}
    res.update(_run_steps(a, plan, micro, boundary))
    res["optimizer_bytes"] = _optimizer_bytes(_basic_optimizer(eopt))
    res["engine_optimizer"] = type(eopt).__name__
    return res


# -- report -----------------------------------------------------------------------------------------
def report(paths: list[str]) -> str:
    rs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["| run | plan (micro x accum x seq) | mode | tokens/s | step s (timed) | peak GiB | "
             "persistent after build GiB | mean ACT steps | loss first -> last |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rs:
        if not r.get("ok", True):
            lines.append(f"| {r['preset']} {r['model']} | {r['plan']} ({r['micro_batch']} x "
                         f"{r['grad_accum']} x {r['seq_len']}) | failed: {r['error'][:200]} | | | "
                         f"{r['peak_train_bytes'] / GiB:.2f} | | | |")
            continue
        act = "" if r.get("act_steps_mean") is None else f"{r['act_steps_mean']:.2f}"
        cap = f", cap {r['mem_cap_gib']:g} GiB" if r.get("mem_cap_gib") else ""
        lines.append(
            f"| {r['preset']} {r['model']} | {r['plan']} ({r['micro_batch']} x {r['grad_accum']} x "
            f"{r['seq_len']}){cap} | "
            f"{r['mode']} | {r['tokens_per_s']:,.0f} | "
            f"{', '.join(f'{s:.3f}' for s in r['step_s'])} | {r['peak_train_bytes'] / GiB:.2f} | "
            f"{r['persistent_after_build_bytes'] / GiB:.2f} | {act} | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    tern = [r for r in rs if r["model"] == "ternary" and r.get("ok", True)]
    dense = [r for r in rs if r["model"] == "dense" and r.get("ok", True)]
    shape = lambda r: (r["preset"], r["micro_batch"], r["grad_accum"], r["seq_len"])  # noqa: E731
    for d in dense:
        for t in tern:
            if shape(t) == shape(d):
                lines.append(f"\n{t['preset']} at {t['micro_batch']} x {t['grad_accum']} x {t['seq_len']}: "
                             f"ternary / dense tokens/s = "
                             f"{t['tokens_per_s'] / d['tokens_per_s']:.3f}x (target >= 1.0); peak memory "
                             f"ternary / dense = {t['peak_train_bytes'] / max(d['peak_train_bytes'], 1):.3f} "
                             f"(target <= 1/6 = 0.167)")
    for r in rs:
        if r.get("phases_one_step_s"):
            ph = ", ".join(f"{k} {v:.3f}" for k, v in r["phases_one_step_s"].items())
            lines.append(f"\n{r['preset']} {r['model']} ({r['micro_batch']} x {r['grad_accum']} x "
                         f"{r['seq_len']}), one step synchronised per phase, s: {ph}")
        if "evidence_probe" in r:
            e = r["evidence_probe"]
            lines.append(f"\n{r['preset']} evidence in backward (one micro-batch, min of reps): backward "
                         f"{e['with_evidence_backward_s']:.3f} s with, {e['no_evidence_backward_s']:.3f} s "
                         f"without; forward {e['with_evidence_forward_s']:.3f} / "
                         f"{e['no_evidence_forward_s']:.3f} s; peak {e['with_evidence_peak_bytes'] / GiB:.2f} "
                         f"/ {e['no_evidence_peak_bytes'] / GiB:.2f} GiB")
        if "state" in r:
            s = r["state"]
            lines.append(f"\n{r['preset']} persistent training state, {s['logical_ternary_weights']:,} "
                         f"logical ternary weights:\n\n| component | bytes | B/weight |\n| --- | ---: | ---: |")
            for k, v in s["bytes"].items():
                lines.append(f"| {k} | {v:,} | {s['B_per_weight'][k]:.4f} |")
            lines.append(f"| **total** | {s['total_bytes']:,} | **{s['total_B_per_weight']:.4f}** |")
            lines.append(f"\nother buffers (largest): {s['other_buffers']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ternary", "dense", "report", "state"])
    p.add_argument("paths", nargs="*", help="report: result JSON files")
    p.add_argument("--plan", default="shard_plans/h100-arb-small.yaml")
    p.add_argument("--preset", default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gc-every", type=int, default=50,
                   help="as the trainer: automatic garbage collection off, a pass every N steps (0: on)")
    p.add_argument("--zero-stage", type=int, default=1, help="dense run's ZeRO stage")
    p.add_argument("--mem-cap-gib", type=float, default=0.0,
                   help="torch.cuda.set_per_process_memory_fraction to this many GiB")
    p.add_argument("--evidence-probe", action="store_true")
    p.add_argument("--activation-checkpointing", nargs="?", const="on", default="plan",
                   choices=("plan", "on", "off"),
                   help="recompute MLA layers and MoEGraph in backward: the plan's setting "
                        "(default; the dense twin then runs without), on, or off")
    p.add_argument("--activation-offload", action="store_true",
                   help="checkpointing with the kept inputs in pinned host memory (ternary runs)")
    p.add_argument("--evidence-dtype", choices=["fp32", "bf16"], default=None,
                   help="override the plan's evidence_dtype (ternary runs)")
    p.add_argument("--phases", action="store_true", help="one extra step timed per phase")
    p.add_argument("--cprofile", action="store_true", help="one extra step under cProfile (printed)")
    p.add_argument("--state", action="store_true", help="persistent state per component (ternary)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.what == "report":
        print(report(a.paths))
        return
    if a.what == "state":   # shapes only, on the meta device: no GPU, no init work
        plan = _plan(a)
        model = ARBModel(planner.training_config(plan), device="meta")
        print(json.dumps(state_breakdown(model, 0), indent=1))
        return
    plan = _plan(a)
    try:
        res = run_ternary(a) if a.what == "ternary" else run_dense(a)
        res["ok"] = True
    except torch.cuda.OutOfMemoryError as e:   # a budget miss is a result, reported as such
        res = {"model": a.what, "ok": False, "error": f"OutOfMemoryError: {str(e)[:400]}",
               "peak_train_bytes": _peak()}
    res.update({"plan": plan.name, "preset": plan.preset, "evidence_dtype": plan.evidence_dtype,
                "micro_batch": plan.micro_batch,
                "grad_accum": plan.grad_accum, "seq_len": plan.seq_len, "warmup": a.warmup,
                "mem_cap_gib": a.mem_cap_gib,
                "device": torch.cuda.get_device_name() if CUDA else "cpu",
                "torch": torch.__version__,
                "total_gpu_bytes": torch.cuda.get_device_properties(0).total_memory if CUDA else 0})
    try:
        import deepspeed
        res["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    text = json.dumps(res, indent=1, default=str)
    print(text, flush=True)
    if a.json:
        Path(a.json).write_text(text)
    if os.environ.get("RANK") is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
