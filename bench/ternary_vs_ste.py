"""Ternary accumulator rule vs BitNet-style STE vs full float, side by side in one run.

    .venv/bin/python bench/ternary_vs_ste.py                       # the benchmark (~10 min, 1 CPU thread)
    .venv/bin/python bench/ternary_vs_ste.py --append-results      # ... and append to bench/RESULTS.md

One ByteLM shape, the same initial seed, the same training batches and the same held-out
windows, trained three ways:
  (a) ternary  packed trits + int8 log scales + int8 accumulators, arbd's accumulator rule,
               evidence-rate schedule in place of a learning rate (arbd/ternary/rule.py)
  (b) ste      BitNet-b1.58-style: fp32 latent weights, absmean ternary in forward,
               straight-through gradient, AdamW (arbd/model/ste.py)
  (c) float    the same model in fp32 with AdamW
Prints held-out bits/byte at the eval steps, persistent training-state bytes per weight
(measured from the live tensors: buffers, parameters, optimizer state) and seconds per step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from arbd.data import load_corpus
from arbd.data.loader import ByteBatches, as_byte_array
from arbd.model.byte_lm import ByteLM, ternary_layers
from arbd.model.ste import decay_groups, float_layers, ste_layers
from arbd.ternary import ternary_matrices, ternary_state_bytes
from arbd.ternary.rule import TUNED_RULE, TernaryRule
from arbd.ternary.update import commit_micro_batch
from arbd.train.evaluate import bits_per_byte
from arbd.train.schedule import warmup_cosine

VARIANTS = ("ternary", "ste", "float")


class SpreadWindows:
    """`count` held-out windows of seq_len + 1 bytes at evenly spread offsets of the val split
    (the first windows alone would all come from one or two files). Iterates like ValWindows."""

    def __init__(self, data, seq_len: int, batch: int, count: int, device: str = "cpu") -> None:
        self.device = device
        self.data = as_byte_array(data)
        n = len(self.data) - seq_len - 1
        if n <= 0:
            raise ValueError("validation split shorter than one window")
        self.starts = np.linspace(0, n, num=min(count, n + 1)).astype(np.int64)
        self.seq_len, self.batch = seq_len, batch

    def __iter__(self):
        for i in range(0, len(self.starts), self.batch):
            s = self.starts[i:i + self.batch]
            w = np.stack([self.data[o:o + self.seq_len + 1] for o in s]).astype(np.int64)
            w = torch.from_numpy(w).to(self.device)
            yield w[:, :-1], w[:, 1:]


def build(variant: str, args) -> ByteLM:
    gen = torch.Generator().manual_seed(args.seed)
    layers = {"ternary": ternary_layers, "ste": ste_layers, "float": float_layers}[variant](generator=gen)
    return ByteLM(args.d_model, args.layers, args.heads, args.mlp, layers=layers)


def state_bytes(variant: str, model: ByteLM, opt) -> tuple[float, float, int]:
    """(persistent bytes/weight, transient gradient bytes/weight, weights)."""
    if variant == "ternary":
        b, n = ternary_state_bytes(model)
        return b / n, 4.0, n  # float32 evidence lives from backward to the update
    n = sum(p.numel() for p in model.parameters())
    b = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        b += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return b / n, 4.0, n  # p.grad (fp32) between backward and the optimizer step


def rule_from_args(args) -> TernaryRule:
    rule = TUNED_RULE
    if args.rule:
        rule = replace(rule, **json.loads(args.rule))
    return rule


def train(variant: str, args, batches_seed: int, val) -> dict:
    torch.manual_seed(args.seed)
    model = build(variant, args).to(args.device)
    total = args.steps
    opt = None
    if variant == "ternary":
        rule = rule_from_args(args)
        model.ternary_rule = rule
        base_lr = None
    else:
        base_lr = args.lr_ste if variant == "ste" else args.lr_float
        opt = torch.optim.AdamW(decay_groups(model, args.wd), lr=base_lr, betas=(0.9, 0.95), eps=1e-8)
    batches = ByteBatches(args.corpus.train, args.seq, args.batch, grad_accum=args.accum, seed=batches_seed)
    evals = sorted(set(args.eval_at) | {total})
    out = {"variant": variant, "bpb": {}, "train_loss": {}}
    if 0 in evals:
        out["bpb"][0] = bits_per_byte(model, val)
    t_train, losses = 0.0, []
    for step in range(1, total + 1):
        t0 = time.perf_counter()
        mult = warmup_cosine(step, total, warmup=args.warmup, floor=args.floor)
        step_loss = 0.0
        for micro in range(args.accum):
            x, y = (t.to(args.device) for t in next(batches))
            loss = model.loss(x, y)
            (loss / args.accum if variant != "ternary" else loss).backward()
            step_loss += loss.item() / args.accum
            if variant == "ternary" and args.evidence == "votes" and micro < args.accum - 1:
                # dp-style: each micro-batch's evidence becomes integer votes on its own
                commit_micro_batch(model, model.ternary_rule, micro_batches=args.accum, rate_mult=mult)
        if variant == "ternary":
            model.ternary_rate_mult = mult
            model.ternary_micro_batches = args.accum if args.evidence == "votes" else 1
            model._ternary_update_memory(loss_signal=step_loss)
        else:
            for g in opt.param_groups:
                g["lr"] = base_lr * mult
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        losses.append(step_loss)
        if step in evals:
            out["bpb"][step] = bits_per_byte(model, val)
            out["train_loss"][step] = float(np.mean(losses[-50:])) / math.log(2)
            extra = ""
            if variant == "ternary":
                s = model.ternary_stats
                extra = f" flips/step {s.last.get('trit_flips', 0)} scale_moves {s.last.get('scale_moves', 0)}"
            print(f"  {variant:8s} step {step:5d} val_bpb {out['bpb'][step]:.4f} "
                  f"train_bpb(last50) {out['train_loss'][step]:.4f} {t_train / step:.3f} s/step{extra}",
                  flush=True)
    out["persistent_B_per_w"], out["transient_B_per_w"], out["weights"] = state_bytes(variant, model, opt)
    out["s_per_step"] = t_train / total
    if variant == "ternary":
        out["skipped"] = model.ternary_stats.skipped_nonfinite_loss + model.ternary_stats.skipped_nonfinite_grad
        out["rule"] = asdict(model.ternary_rule)
        mats = ternary_matrices(model)
        out["zero_fraction"] = float(np.mean([float((m.trits() == 0).float().mean()) for _, m in mats if m.cols > 1]))
        out["diag"] = {n: {"E_mean": float(m.exponent.float().mean()), "E_std": float(m.exponent.float().std()),
                           "zero": float((m.trits() == 0).float().mean()), "neg": float((m.trits() == -1).float().mean()),
                           "acc_abs": float(m.t_accum.float().abs().mean())} for n, m in mats}
    return out


def table(results: list[dict], evals: list[int]) -> str:
    by = {r["variant"]: r for r in results}
    head = "| variant | " + " | ".join(f"bpb @{s}" for s in evals) + \
        " | persistent B/weight | + transient grad | s/step |"
    lines = [head, "|" + "---|" * (len(evals) + 4)]
    for r in results:
        cells = [f"{r['bpb'][s]:.3f}" for s in evals]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) +
                     f" | {r['persistent_B_per_w']:.3f} | {r['transient_B_per_w']:.0f} | {r['s_per_step']:.3f} |")
    if "ternary" in by and "ste" in by:
        cells = [f"{by['ternary']['bpb'][s] / by['ste']['bpb'][s]:.3f}" for s in evals]
        lines.append("| ternary / ste | " + " | ".join(cells) + " | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--evidence", default="votes", choices=["votes", "float"],
                   help="ternary with --accum > 1: quantise each micro-batch into integer votes "
                        "(as dp ranks do with sign votes) or sum float gradients and quantise once "
                        "(as a summed-gradient all-reduce does)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-at", default="250,500,1000,1500")
    p.add_argument("--val-windows", type=int, default=512)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--floor", type=float, default=0.1, help="final schedule multiplier")
    p.add_argument("--lr-ste", type=float, default=8e-3)
    p.add_argument("--lr-float", type=float, default=6e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--rule", default="", help="JSON overrides of the tuned TernaryRule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 threads oversubscribe badly)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="write results as JSON here")
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.eval_at = [int(s) for s in args.eval_at.split(",") if s]
    evals = sorted(set(args.eval_at) | {args.steps})
    args.corpus = load_corpus(args.data)
    val = SpreadWindows(args.corpus.val, args.seq, 32, args.val_windows, args.device)
    print(f"ternary_vs_ste: d={args.d_model} L={args.layers} H={args.heads} mlp={args.mlp} seq={args.seq} "
          f"batch={args.batch}x{args.accum} steps={args.steps} threads={args.threads} "
          f"rule={rule_from_args(args)}", flush=True)
    t0 = time.perf_counter()
    results = []
    for v in args.variants.split(","):
        results.append(train(v, args, args.seed, val))
    wall = time.perf_counter() - t0
    tab = table(results, evals)
    print(tab)
    print(f"wall {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "corpus"},
                       "results": results, "wall_s": wall}, f, indent=1, default=str)
    if args.append_results:
        cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
        machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        with open(path, "a") as f:
            f.write(f"\n## ternary_vs_ste ({time.strftime('%Y-%m-%d')})\n\n`{cmd}`  \n{machine}; "
                    f"wall {wall:.0f} s; held-out = {len(val.starts)} windows x {args.seq} bytes spread over "
                    f"the val split\n\n{tab}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
