"""A short CPU training run of the arb-tiny ternary layers on the embedded corpus.

    python -m arbd.train.tiny --steps 60

Prints the loss per step and the held-out bits/byte before and after. This is the foundation's
main job; launch/pretrain.py grows from it into the full DeepSpeed run.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from arbd.config import get_preset
from arbd.data import ByteBatches, ValWindows, load_corpus
from arbd.model.byte_lm import ByteLM, ternary_layers
from arbd.ternary import ternary_state_bytes
from arbd.ternary.rule import preset_rule
from arbd.train.schedule import warmup_cosine
from arbd.train.evaluate import bits_per_byte


def build_model(preset: str, backend: str, seed: int) -> ByteLM:
    cfg = get_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    return ByteLM(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.expert_hidden,
                  layers=ternary_layers(backend, gen))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="arb-tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--backend", default="torch", choices=["torch", "triton"])
    p.add_argument("--data", default=None, help="a byte file or directory (default: stdlib corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--val-windows", type=int, default=64)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    corpus = load_corpus(args.data)
    model = build_model(args.preset, args.backend, args.seed)
    model.ternary_rule = preset_rule(args.preset)
    state_bytes, weights = ternary_state_bytes(model)
    print(f"arb run: preset={args.preset} ternary weights={weights:,} "
          f"persistent state={state_bytes / weights:.3f} B/weight corpus={corpus.kind} "
          f"train={corpus.train.nbytes:,} B", flush=True)

    batches = ByteBatches(corpus.train, args.seq_len, args.batch, seed=args.seed)
    val = ValWindows(corpus.val, args.seq_len, 32, max_windows=args.val_windows) if corpus.val else None
    if val is not None:
        print(f"step 0 val_bpb {bits_per_byte(model, val):.4f}", flush=True)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(batches)
        model.ternary_rate_mult = warmup_cosine(step, args.steps, warmup=max(1, args.steps // 20))
        loss = model.loss(x, y)
        loss.backward()
        model._ternary_update_memory(loss_signal=loss)
        if step % args.log_interval == 0 or step == args.steps:
            s = model.ternary_stats
            print(f"step {step} loss {loss.item():.4f} bpb {loss.item() / math.log(2):.4f} "
                  f"flips {s.last.get('trit_flips', 0)} scale_moves {s.last.get('scale_moves', 0)}",
                  flush=True)
    dt = time.perf_counter() - t0
    if val is not None:
        print(f"step {args.steps} val_bpb {bits_per_byte(model, val):.4f}", flush=True)
    tokens = args.steps * args.batch * args.seq_len
    print(f"done: {args.steps} steps, {tokens / dt:,.0f} bytes/s, skipped non-finite "
          f"{model.ternary_stats.skipped_nonfinite_loss}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
