"""MLA tensor parallelism (Megatron / DeepSeek style), applied to a plain model after it is built.

For a layer with H heads on a tp group of size P, rank t keeps heads [t*H/P, (t+1)*H/P):

    wq_b, wkv_b   column-parallel: their output rows (head-major, see arbd/model/mla.py) are split,
                  so each rank computes its heads' queries, keys and values only;
    wo            row-parallel: its input columns (head-major values) are split, each rank
                  multiplies its heads' values, and one all-reduce sums the partial outputs;
    wq_a, wkv_a, the norms, the KV latent and the RoPE key stay replicated.

Autograd needs two conjugate operations (Megatron's f and g): `copy_to_tp` is the identity
forward and an all-reduce of the gradient backward (placed where a replicated tensor enters
per-head computation: the inputs of wq_b and wkv_b and the RoPE key), and `reduce_from_tp` is
an all-reduce forward and the identity backward (the output of wo). With them every replicated
weight sees the full gradient on every rank, so replicated ternary state stays identical.

The split matrices keep their ternary state sliced (TPShard on each TernaryMatrix); the update
rule reads the shard description so a split matrix votes exactly as the whole one would
(TernaryMatrix.quantize). Hooks, not wrapper modules, insert the collectives, so parameter and
buffer names stay those of the plain model (checkpoints and resharding rely on it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from arbd.model.mla import MLA
from arbd.ternary import packing
from arbd.ternary.layers import TernaryLinear
from arbd.ternary.state import TernaryMatrix, TPShard


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over `group` backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) over `group` forward; identity backward."""
    return _ReduceFromTP.apply(x, group)


@torch.no_grad()
def shard_matrix(m: TernaryMatrix, dim: int, start: int, stop: int, group) -> None:
    """Keep rows (dim 0) or columns (dim 1) [start, stop) of a whole TernaryMatrix, in place.

    Column slices unpack the trits, cut, and repack each local row on its own. Accumulators
    follow the same slice; per-row exponents stay whole (a row-parallel row keeps its scale)."""
    if m.tp_shard is not None or m.is_partitioned:
        raise RuntimeError("shard_matrix needs a whole, unpartitioned TernaryMatrix (apply tensor "
                           "parallelism before ZeRO partitions the accumulators)")
    size = m.rows if dim == 0 else m.cols
    if not 0 <= start < stop <= size:
        raise ValueError(f"slice [{start}, {stop}) is outside [0, {size}) of dim {dim}")
    if dim == 0:
        m.packed = m.packed[start:stop].clone()
        m.exponent = m.exponent[start:stop].clone()
        m.t_accum = m.t_accum[start:stop].clone()
        m.e_accum = m.e_accum[start:stop].clone()
        m.rows = m.row_stop = stop - start
    elif dim == 1:
        m.packed = packing.pack_trits(m.trits()[:, start:stop].contiguous())
        m.t_accum = m.t_accum[:, start:stop].clone()
        m.cols = stop - start
    else:
        raise ValueError(f"dim must be 0 or 1, got {dim}")
    m.tp_shard = TPShard(dim=dim, offset=start, global_size=size, group=group)
    m.clear_evidence()


def _shard_linear(lin: TernaryLinear, dim: int, parts: int, index: int, group) -> None:
    size = lin.out_features if dim == 0 else lin.in_features
    step = size // parts
    shard_matrix(lin.weight, dim, index * step, (index + 1) * step, group)
    if dim == 0:
        lin.out_features = step
    else:
        lin.in_features = step


def parallelize_mla(layer: MLA, group, tp: int, tp_index: int) -> None:
    """Split one MLA layer's heads over the tp group (this rank keeps block `tp_index`)."""
    if layer.n_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the {layer.n_heads} heads; "
                         f"choose tp in {[d for d in range(1, layer.n_heads + 1) if layer.n_heads % d == 0]}")
    if layer.n_local_heads != layer.n_heads:
        raise RuntimeError("this MLA layer is tensor-parallel already")
    if tp == 1:
        return
    _shard_linear(layer.wq_b, 0, tp, tp_index, group)
    _shard_linear(layer.wkv_b, 0, tp, tp_index, group)
    _shard_linear(layer.wo, 1, tp, tp_index, group)
    layer.n_local_heads = layer.n_heads // tp
    enter = lambda _mod, args: (copy_to_tp(args[0], group),) + tuple(args[1:])  # noqa: E731
    layer.wq_b.register_forward_pre_hook(enter)
    layer.wkv_b.register_forward_pre_hook(enter)
    layer.rope_key.register_forward_hook(lambda _mod, _args, out: copy_to_tp(out, group))
    layer.wo.register_forward_hook(lambda _mod, _args, out: reduce_from_tp(out, group))


def parallelize_attention(layers: nn.ModuleList, group, tp: int, tp_index: int) -> None:
    for layer in layers:
        parallelize_mla(layer, group, tp, tp_index)
