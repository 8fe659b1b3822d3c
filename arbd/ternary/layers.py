"""Ternary layers: plain nn.Modules whose weights are TernaryMatrix buffers.

Each layer enters autograd through a small Function that takes a zero-size `anchor` tensor
requiring grad. The anchor guarantees backward runs even when the input needs no gradient
(token ids), and backward hands dL/dW to the layer's TernaryMatrix as evidence instead of
returning it: there is no Parameter to hold it.
"""
from __future__ import annotations

import torch
from torch import nn

from arbd.ternary import ops
from arbd.ternary.state import TernaryMatrix


def _anchor(device: torch.device) -> torch.Tensor:
    return torch.empty(0, device=device, requires_grad=True)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, matrix: TernaryMatrix, backend: str, bucket: bool):
        ctx.matrix, ctx.backend, ctx.bucket = matrix, backend, bucket
        # x, and the decoded W where it is no larger than x (else backward decodes it again).
        y, w = ops.linear_forward_for_backward(x, matrix, backend, bucket)
        ctx.save_for_backward(x, w)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = ops.linear_backward(gy, x, w, ctx.matrix, ctx.backend, ctx.needs_input_grad[0], ctx.bucket)
        return gx, None, None, None, None


class _DecodedFn(torch.autograd.Function):
    """Decoded weight (or some of its rows) as a differentiable tensor; grads become evidence."""

    @staticmethod
    def forward(ctx, anchor, matrix: TernaryMatrix, rows, dtype):
        ctx.matrix, ctx.rows = matrix, rows
        return matrix.decode(dtype) if rows is None else matrix.decode_rows(rows, dtype)

    @staticmethod
    def backward(ctx, g):
        if ctx.rows is None:
            ctx.matrix.add_grad(g)
        else:
            ctx.matrix.add_row_grad(ctx.rows, g)
        return None, None, None, None


def decoded_weight(matrix: TernaryMatrix, dtype: torch.dtype,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Decode `matrix` (or `rows` of it); under autograd its gradient feeds the matrix's evidence."""
    if not torch.is_grad_enabled():
        return matrix.decode(dtype) if rows is None else matrix.decode_rows(rows, dtype)
    return _DecodedFn.apply(_anchor(matrix.packed.device), matrix, rows, dtype)


class TernaryLinear(nn.Module):
    """y = x @ W.T with W = trits * 2 ** (E / k) per output row. No bias: the model is ternary."""

    def __init__(self, in_features: int, out_features: int, *, backend: str = "torch",
                 std: float | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = ops.check_backend(backend)
        self.weight = TernaryMatrix(out_features, in_features, std=std, generator=generator, device=device)
        # True where the row count changes from call to call (ACT steps, experts, graph nodes):
        # cuBLAS then runs on rounded-up row counts, so that its shapes repeat (ops says why).
        # Layers with a fixed row count skip that copy of their inputs.
        self.varying_rows = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TernaryLinear expects {self.in_features} input features, got {x.shape[-1]}")
        w = self.weight
        if not torch.is_grad_enabled():
            return ops.linear_forward(x, w.packed, w.exponent, w.cols, self.backend, self.varying_rows)
        return _LinearFn.apply(x, _anchor(x.device), w, self.backend, self.varying_rows)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, backend={self.backend}"


class TernaryRMSNorm(nn.Module):
    """RMSNorm with a ternary gain: gain_i = t_i * 2 ** (E_i / k), one row per channel so that
    each channel's int8 exponent learns its own magnitude. Starts as the identity (t = 1, E = 0)."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gain = TernaryMatrix(dim, 1, init="ones", device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"TernaryRMSNorm expects {self.dim} features, got {x.shape[-1]}")
        m = self.gain
        grad = torch.is_grad_enabled()
        if grad and not ops.use_fused_kernel(ops.FUSED_NORM, x):
            # torch formula: the gain's decode is an autograd node of its own (_DecodedFn)
            return ops.rms_norm(x, decoded_weight(m, x.dtype).reshape(self.dim), self.eps)
        # The decoded gain is kept until the update changes it: no decode launch per call.
        g = m.decoded_shared(x.dtype, lambda: m.decode(x.dtype), keep=True).reshape(self.dim)
        if not grad:
            return ops.rms_norm(x, g, self.eps)
        from arbd.ternary.triton_norm import TernaryRMSNormFn
        return TernaryRMSNormFn.apply(x, _anchor(x.device), m, g, self.eps)


def id_range(ids: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor, (0, 0) if empty, read back in one synchronisation."""
    if ids.numel() == 0:
        return 0, 0
    lo, hi = torch.aminmax(ids)
    return tuple(torch.stack([lo, hi]).tolist())


class TernaryEmbeddingTable(nn.Module):
    """Ternary rows looked up by id.

    sparse=False decodes the whole table (fine for small vocabularies); sparse=True decodes only
    the distinct requested rows and sends per-row evidence back, so a step touches only those rows.
    """

    def __init__(self, num_embeddings: int, dim: int, *, sparse: bool = False, std: float = 1.0,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.dim, self.sparse = num_embeddings, dim, sparse
        self.weight = TernaryMatrix(num_embeddings, dim, std=std, generator=generator, device=device)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise ValueError(f"embedding ids must be an integer tensor, got {ids.dtype}")
        ids = ids.long()
        lo, hi = id_range(ids)
        if lo < 0 or hi >= self.num_embeddings:
            raise ValueError(f"embedding ids must lie in [0, {self.num_embeddings}), "
                             f"got range [{lo}, {hi}]")
        if not self.sparse:
            return nn.functional.embedding(ids, decoded_weight(self.weight, dtype))
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        return decoded_weight(self.weight, dtype, rows=uniq)[inverse]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} x {self.dim}, sparse={self.sparse}"
