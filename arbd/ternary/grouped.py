"""All experts of a MoE layer in a few grouped GEMMs instead of a loop of ternary linear layers.

A ternary linear layer costs the host several times what nn.Linear does (decode, padding,
evidence; bench/RESULTS.md), and MoEGraph runs 2 of them per expert per ACT step, forward and
backward: at arb-small's 8 experts the expert loop is host-bound, the GPU idle between small
GEMMs. Here the experts' rows arrive sorted by expert with their counts, every expert's W is
decoded once into one stacked tensor (shared by the ACT steps of a micro-batch while autograd
holds it), and `torch._grouped_mm` runs the up and down products of all experts in one launch
each; backward runs the two input-gradient products grouped too. The weight evidence stays per
expert (`TernaryMatrix.add_grad_product`: fp32 accumulation into each matrix's evidence, the
same arithmetic as the layer path).

Numerically this is the per-expert path with another GEMM kernel: the same bf16 inputs, fp32
accumulation, one rounding of each output (bench/RESULTS.md has the comparison on the H100).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from arbd.ternary import ops
from arbd.ternary.state import TernaryMatrix

# "auto": CUDA inputs of the triton backend (where the expert loop is host-bound); "on": wherever
# torch._grouped_mm runs (the CPU tests); "off": always the per-expert loop.
GROUPED_EXPERTS = "auto"

_SUPPORTED: dict[tuple[torch.device, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm exists here and agrees with a loop of matmuls (checked once per
    device and dtype, with an empty group and transposed weights as used below)."""
    key = (device, dtype)
    ok = _SUPPORTED.get(key)
    if ok is None:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(40, 16, device=device, generator=g).to(dtype)
            w = torch.randn(3, 24, 16, device=device, generator=g).to(dtype)
            offs = torch.tensor([9, 9, 40], dtype=torch.int32, device=device)
            got = torch._grouped_mm(a, w.transpose(1, 2), offs=offs).float()
            want = torch.cat([a[:9].float() @ w[0].float().t(), a[9:].float() @ w[2].float().t()])
            ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2)) and got.shape == want.shape
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            ok = False
        _SUPPORTED[key] = ok
    return ok


def use_grouped(x: torch.Tensor, backend: str) -> bool:
    if GROUPED_EXPERTS == "off" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if GROUPED_EXPERTS == "auto" and not (backend == "triton" and x.is_cuda and x.dtype != torch.float32):
        return False
    return grouped_mm_works(x.device, x.dtype)


_STACKS: dict[tuple[int, ...], tuple] = {}


def stacked_decoded(mats: list[TernaryMatrix], dtype: torch.dtype, backend: str) -> torch.Tensor:
    """[E, N, K] decoded weights of equally shaped matrices, or the stack an earlier call returned
    if that tensor is still alive (autograd holds it for a backward) and no matrix changed since
    (the same buffers at the same version counters): the ACT steps of a micro-batch decode once."""
    key = (dtype,) + tuple(t._version for m in mats for t in (m.packed, m.exponent))
    ids = tuple(id(m) for m in mats)
    hit = _STACKS.get(ids)
    if hit is not None and hit[0] == key and all(r() is m.packed for r, m in zip(hit[1], mats)):
        w = hit[2]()
        if w is not None:
            return w
    n, k = mats[0].rows, mats[0].cols
    w = torch.empty(len(mats), n, k, dtype=dtype, device=mats[0].packed.device)
    for i, m in enumerate(mats):
        if backend == "triton":
            ops._triton().decode_weight(m.packed, m.exponent, k, dtype, out=w[i])
        else:
            w[i] = m.decode(dtype)
    for dead in [i for i, v in _STACKS.items() if v[2]() is None]:
        del _STACKS[dead]
    _STACKS[ids] = (key, [weakref.ref(m.packed) for m in mats], weakref.ref(w))
    return w


def group_offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """torch._grouped_mm's `offs`: int32 end row of each group, on `device`."""
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if device.type == "cuda":   # pinned: a pageable copy would wait for the queued work
        offs = offs.pin_memory().to(device, non_blocking=True)
    return offs


class _GroupedFFN(torch.autograd.Function):
    """y = down(relu(up(x))^2) per expert, rows of x grouped by expert (offsets: group ends)."""

    @staticmethod
    def forward(ctx, x, anchor, counts: list[int], ups: list[TernaryMatrix],
                downs: list[TernaryMatrix], backend: str):
        w_up = stacked_decoded(ups, x.dtype, backend)        # [E, H, D]
        w_down = stacked_decoded(downs, x.dtype, backend)    # [E, D, H]
        offs = group_offsets(counts, x.device)
        h = torch._grouped_mm(x, w_up.transpose(1, 2), offs=offs)
        y = torch._grouped_mm(F.relu(h).square(), w_down.transpose(1, 2), offs=offs)
        ctx.counts, ctx.ups, ctx.downs, ctx.backend = counts, ups, downs, backend
        ctx.save_for_backward(x, h, w_up, w_down, offs)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h, w_up, w_down, offs = ctx.saved_tensors
        gy = gy.contiguous()
        r = F.relu(h)
        gh = torch._grouped_mm(gy, w_down, offs=offs) * (2 * r)
        gx = torch._grouped_mm(gh, w_up, offs=offs) if ctx.needs_input_grad[0] else None
        a = r.square()
        start = 0
        for c, up, down in zip(ctx.counts, ctx.ups, ctx.downs):
            if c:   # an expert without rows gets no evidence, as when the layer is not called
                sl = slice(start, start + c)
                down.add_grad_product(gy[sl], a[sl], ctx.backend)
                up.add_grad_product(gh[sl], x[sl], ctx.backend)
            start += c
        return gx, None, None, None, None, None


def grouped_relu2_ffn(x: torch.Tensor, counts: list[int], ups: list[TernaryMatrix],
                      downs: list[TernaryMatrix], backend: str) -> torch.Tensor:
    """The experts' relu^2 FFN on rows x [R, D] sorted by expert, counts[e] rows for expert e
    (ups[e]: D -> H, downs[e]: H -> D)."""
    if sum(counts) != x.shape[0] or not (len(counts) == len(ups) == len(downs)):
        raise ValueError(f"{len(counts)} counts summing to {sum(counts)}, {len(ups)} up and "
                         f"{len(downs)} down matrices for {x.shape[0]} rows")
    anchor = torch.empty(0, device=x.device, requires_grad=True)   # a graph even for constant x
    return _GroupedFFN.apply(x.contiguous(), anchor, list(counts), list(ups), list(downs), backend)
