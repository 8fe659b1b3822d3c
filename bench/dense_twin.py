"""A dense bf16 stand-in for an ARBModel: the same modules and forward, float weights.

`densify(model)` swaps, in place, every ternary piece of a built ARBModel for a float one with
the same shape, initialised from the decoded ternary weights (so both models compute the same
function at step 0):

    TernaryLinear(in, out)         -> DenseLinear: Parameter [out, in], F.linear, no bias
    TernaryRMSNorm(d)              -> DenseRMSNorm: Parameter [d] gain, same arithmetic
    TernaryEmbeddingTable(n, d)    -> DenseEmbedding: Parameter [n, d], F.embedding
    TernaryVQCodebook(rows, dim)   -> DenseCodebook: Parameter [rows, dim]; the same hash
                                      candidates (ids only), then float scores over the C gathered
                                      rows (exact scan below exact_max rows); same losses, same
                                      straight-through output, same usage counters

Everything else (sequencer wiring, MemGram hashing, LTI, MLA, ledger, MoEGraph + ACT, KG edges,
heads, losses) is the model's own code, except that where the ternary model runs its experts as
grouped GEMMs (arbd/ternary/grouped.py) the twin does too (`torch._grouped_mm` over the stacked
float weights, autograd through it), so neither side has a launch-count advantage there. The optimizer (Adam under DeepSpeed) owns the Parameters;
DeepSpeed's bf16 mode casts them to bf16 and keeps fp32 masters.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from arbd.ternary import TernaryEmbeddingTable, TernaryLinear, TernaryRMSNorm, ops
from arbd.vq import lookup
from arbd.vq.codebook import TernaryVQCodebook, USAGE_MAX, VQOutput


class DenseLinear(nn.Module):
    def __init__(self, t: TernaryLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = t.in_features, t.out_features
        self.weight = nn.Parameter(t.weight.decode(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class DenseRMSNorm(nn.Module):
    def __init__(self, t: TernaryRMSNorm) -> None:
        super().__init__()
        self.dim, self.eps = t.dim, t.eps
        self.gain = nn.Parameter(t.gain.decode(torch.float32).reshape(t.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.gain.to(x.dtype), self.eps)   # the ternary norm's arithmetic


class DenseEmbedding(nn.Module):
    def __init__(self, t: TernaryEmbeddingTable) -> None:
        super().__init__()
        self.num_embeddings, self.dim = t.num_embeddings, t.dim
        self.weight = nn.Parameter(t.weight.decode(torch.float32))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return F.embedding(ids.long(), self.weight).to(dtype)


class DenseCodebook(nn.Module):
    """Float rows; candidates from the ternary codebook's own hash and cell layout."""

    def __init__(self, t: TernaryVQCodebook) -> None:
        super().__init__()
        self.num_codes, self.dim, self.exact_max = t.num_codes, t.dim, t.exact_max
        self.candidate_count, self.beta = t.candidate_count, t.beta
        self.hasher, self.layout = t.hasher, t.layout
        self.weight = nn.Parameter(t.matrix.decode(torch.float32))
        self.register_buffer("usage", t.usage.clone())

    @torch.no_grad()
    def _lookup_flat(self, flat: torch.Tensor) -> torch.Tensor:
        w = self.weight
        x = flat.to(w.dtype)
        if self.num_codes > self.exact_max:
            xq, _ = lookup.quantize_queries(flat)
            cand, valid = lookup.candidate_ids(xq, self.hasher, self.layout, self.candidate_count)
            rows = w[cand]                                                  # [N, C, dim]
            score = rows.float().pow(2).sum(-1) - 2 * torch.einsum("nd,ncd->nc", x, rows).float()
            score = score.masked_fill(~valid, float("inf"))
            return cand.gather(1, score.argmin(1, keepdim=True)).squeeze(1)
        score = w.float().pow(2).sum(-1)[None, :] - 2 * (x @ w.t()).float()  # small tables only
        return score.argmin(1)

    def decode_rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.detach()[ids].to(dtype)

    def forward(self, x: torch.Tensor) -> VQOutput:
        flat = x.reshape(-1, self.dim)
        ids = self._lookup_flat(flat)
        uniq, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
        q = self.weight.index_select(0, uniq).float().index_select(0, inverse)
        xf = flat.float()
        denom = max(xf.numel(), 1)
        codebook_loss = (xf.detach() - q).pow(2).sum() / denom
        commitment = (xf - q.detach()).pow(2).sum() / denom
        loss = codebook_loss + self.beta * commitment
        out = q.detach().to(x.dtype) + (flat - flat.detach())
        if self.training:
            with torch.no_grad():
                cur = self.usage[uniq].to(torch.int64)
                self.usage[uniq] = (cur + counts).clamp_max(USAGE_MAX).to(torch.int32)
        return VQOutput(out.reshape(x.shape), ids.reshape(x.shape[:-1]), loss, commitment,
                        codebook_loss)


SWAPS = ((TernaryVQCodebook, DenseCodebook), (TernaryLinear, DenseLinear),
         (TernaryRMSNorm, DenseRMSNorm), (TernaryEmbeddingTable, DenseEmbedding))


@torch.no_grad()
def densify(model: nn.Module) -> dict[str, int]:
    """Swap every ternary module of `model` for its dense twin, in place; returns counts by kind."""
    counts: dict[str, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            for kind, dense in SWAPS:
                if isinstance(child, kind):
                    parent._modules[name] = dense(child)
                    counts[dense.__name__] = counts.get(dense.__name__, 0) + 1
                    break
    moe = getattr(model, "moegraph", None)
    if moe is not None and getattr(moe, "use_moe", False):
        moe.grouped_ffn = _dense_grouped_ffn
    return counts


def _dense_grouped_ffn(rows: torch.Tensor):
    """MoEGraph.grouped_ffn for DenseLinear experts: where the ternary model would group its
    experts, the up and down products of every expert in one torch._grouped_mm each over the
    stacked float weights (autograd through them); else None, the model's per-expert loop."""
    from arbd.ternary import grouped
    return _dense_ffn if grouped.use_grouped(rows, "triton") else None


def _dense_ffn(x: torch.Tensor, counts: list[int], experts: list[nn.Module]) -> torch.Tensor:
    from arbd.ternary import grouped
    offs = grouped.group_offsets(counts, x.device)
    w_up = torch.stack([e.up.weight for e in experts]).to(x.dtype)       # [E, H, D]
    w_down = torch.stack([e.down.weight for e in experts]).to(x.dtype)   # [E, D, H]
    h = torch._grouped_mm(x.contiguous(), w_up.transpose(1, 2), offs=offs)
    return torch._grouped_mm(F.relu(h).square(), w_down.transpose(1, 2), offs=offs)
