"""MLA's RoPE on the query's last channels (mla.rope_tail): the torch formula (split, float32
rotation, cat) against the fused Triton kernel (arbd/model/triton_rope.py), on arb-small's shapes.

    python3 bench/gpu_rope.py [--batch 32] [--seq-len 1023]

For the query [B, T, 16, 64 + 32] and the key's RoPE part (a 32-channel view of 288-wide rows):
forward and forward + backward, microseconds per call over 20 calls back to back (CUDA events),
with a clone of the tensor as the memory-bound yardstick, and how many bf16 values differ from
the torch formula.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.model import mla  # noqa: E402
from bench.gpu_mla_graph import per_call  # noqa: E402


def _us(fn) -> float:
    """GPU microseconds per call over 20 calls back to back (CUDA events)."""
    return per_call(fn)[1] * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1023)
    a = p.parse_args()
    pos = torch.arange(a.seq_len, device="cuda")
    cases = (("q [B, T, 16, 96], 64 + 32", (a.batch, a.seq_len, 16, 96), 64, 0),
             ("k_pe [B, T, 32] of 288-wide rows", (a.batch, a.seq_len, 288), 0, 256))
    print("| tensor | torch us | fused us | fwd + bwd torch / fused us | clone us | values differing |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, shape, nope, offset in cases:
        x = torch.randn(*shape, device="cuda").bfloat16()[..., offset:]
        g = torch.randn(*x.shape, device="cuda").bfloat16()
        xr = x.detach().requires_grad_()
        times = {}
        for mode in ("off", "auto"):
            mla.FUSED_ROPE = mode
            out = mla.rope_tail(x, nope, pos, 10000.0, start=0)
            times[mode] = (_us(lambda: mla.rope_tail(x, nope, pos, 10000.0, start=0)),
                           _us(lambda: mla.rope_tail(xr, nope, pos, 10000.0, start=0).backward(g)), out)
        differing = (times["auto"][2] != times["off"][2]).float().mean().item()
        print(f"| {name} | {times['off'][0]:.1f} | {times['auto'][0]:.1f} | {times['off'][1]:.0f} / "
              f"{times['auto'][1]:.0f} | {_us(lambda: x.clone()):.1f} | {differing:.1e} |")


if __name__ == "__main__":
    main()
