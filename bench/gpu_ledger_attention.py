"""The ContextAttentionScheduler's attention (one head of dimension d_model over the KV ledger):
ledger.ledger_attention against SDPA's kernel for that shape, forward and forward + backward.

    python3 bench/gpu_ledger_attention.py [--preset arb-small] [--batch 32] [--reps 10]

SDPA has no flash or cuDNN kernel for a head dimension over 256 and falls back to its generic
memory-efficient kernel. Both run side by side in one process on the preset's shapes (T =
seq_len, L = kv_ledger_len, d = d_model), bf16; each is compared with a float64 answer on the
first batch row. Medians of CUDA event times.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.model.ledger import ledger_attention  # noqa: E402
from arbd.parallel import planner  # noqa: E402
from bench.gpu_update import event_median_ms  # noqa: E402


def _sdpa(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[:, None], kv[:, None], kv[:, None])[:, 0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="arb-small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    cfg = planner.training_config(a.preset)
    B, T, L, d = a.batch, a.seq_len, cfg.kv_ledger_len, cfg.d_model
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
    kv = (torch.randn(B, L, d, device="cuda", generator=g) * d ** -0.5).bfloat16().requires_grad_()
    up = torch.randn(B, T, d, device="cuda", generator=g).bfloat16()
    q64, kv64 = q[:1].detach().double().requires_grad_(), kv[:1].detach().double().requires_grad_()
    ref = torch.softmax(q64 @ kv64.transpose(1, 2) / d ** 0.5, -1) @ kv64
    (ref * up[:1].double()).sum().backward()
    print(f"{a.preset}: B {B}, T {T}, L {L}, d {d}, bf16")
    print("| attention | forward ms | forward + backward ms | rel err out / dq / dkv (row 0, vs float64) |")
    print("| --- | ---: | ---: | --- |")
    for name, fn in (("SDPA (its kernel for d > 256)", _sdpa), ("ledger_attention", ledger_attention)):
        q.grad = kv.grad = None
        out = fn(q, kv)
        (out * up).sum().backward()
        err = [float((got[:1].double() - want).abs().max() / want.abs().max())
               for got, want in ((out, ref), (q.grad, q64.grad), (kv.grad, kv64.grad))]
        with torch.no_grad():
            fwd = event_median_ms(lambda: fn(q, kv), a.reps, warmup=3)

        def both():
            q.grad = kv.grad = None
            (fn(q, kv) * up).sum().backward()
        fb = event_median_ms(both, a.reps, warmup=3)
        print(f"| {name} | {fwd:.3f} | {fb:.3f} | " + " / ".join(f"{e:.2e}" for e in err) + " |")
    print(f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
