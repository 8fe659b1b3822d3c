"""TernaryVQCodebook: a ternary codebook with exact or candidate lookup and touched-row learning.

State (all buffers): the rows' TernaryMatrix (packed trits, int8 exponent, int8 trit and scale
accumulators: 79 bytes per 64-wide row) and an int32 usage counter per row (4 bytes): 83 bytes per
row, 1.297 bytes per trit. With state_layout="record" the matrix keeps each row as one 80-byte
record (84 bytes per row, 1.3125 per trit), which GPU touched-row updates move faster. The hash layout is derived from (num_codes, cell_size, hash_seed) and
is not stored per row.

A step: forward picks a row per query (exact scan for tables of at most `exact_max` rows, sign-hash
candidates above), decodes only the chosen rows through `decoded_weight(rows=...)` so backward
hands their gradient to the matrix as sparse row evidence, and counts usage for those rows;
`apply_update(rule)` (or the model-wide `apply_ternary_update`) then rewrites only rows with
evidence. docs/decisions.md ("## Codebooks") gives the reasons and the measurements.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from arbd.ternary import packing
from arbd.ternary.layers import decoded_weight
from arbd.ternary.rule import TernaryRule
from arbd.ternary.state import TernaryMatrix
from arbd.vq import lookup
from arbd.vq.hashing import CellLayout, SignHash, hash_bits_for

DEFAULT_CELL_SIZE = 1          # nominal rows per hash cell: finest cells, most probes (bench/RESULTS.md)
DEFAULT_MAX_CHUNK_BYTES = 64 << 20
USAGE_MAX = torch.iinfo(torch.int32).max
_INIT_BLOCK = 1 << 18          # rows initialised per block: bounds init memory, fixes the RNG stream


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class VQOutput(NamedTuple):
    quantized: torch.Tensor      # [..., dim]: the chosen rows forward, identity gradient to the input
    ids: torch.Tensor            # int64 [...]: chosen row per input vector (motif id)
    loss: torch.Tensor           # codebook_loss + beta * commitment
    commitment: torch.Tensor     # mean (x - sg(q))^2: pulls the input towards its code
    codebook_loss: torch.Tensor  # mean (sg(x) - q)^2: evidence for the chosen rows


class PlacedTernaryMatrix(TernaryMatrix):
    """A TernaryMatrix whose random init puts every row in its hash cell, block by block.

    Blocks keep the init of a 10M-row table at a few hundred MB of transients (the base class
    draws one [rows, cols] float tensor) and make the random stream independent of the device.

    `global_range=(start, stop)` builds only rows [start, stop) of a `layout.num_codes`-row
    table (a codebook shard) with exactly the bytes the whole table would hold there: the blocks
    before the range are drawn and dropped without decoding (consuming the stream as placement
    would), the block holding the range is built in full and sliced, and the loop stops after it.
    """

    def __init__(self, rows: int, cols: int, *, hasher: SignHash, layout: CellLayout,
                 std: float, seed: int, device: torch.device | str | None = None,
                 global_range: tuple[int, int] | None = None, state_layout: str = "arrays") -> None:
        start, stop = global_range if global_range is not None else (0, rows)
        if stop - start != rows or not 0 <= start < stop <= layout.num_codes:
            raise ValueError(f"global_range {global_range} must hold {rows} rows inside "
                             f"[0, {layout.num_codes})")
        # Global row range (not TernaryMatrix.row_start/row_stop, which name the rows whose
        # accumulators a ZeRO partition keeps). Read by reset(), which __init__ calls.
        self.global_start, self.global_stop = start, stop
        self._placement = (hasher, layout, std, seed)
        super().__init__(rows, cols, init="placed", device=device, layout=state_layout)

    @torch.no_grad()
    def reset(self, init: str = "placed", *, std: float | None = None,
              generator: torch.Generator | None = None) -> None:
        if init != "placed":
            return super().reset(init, std=std, generator=generator)
        hasher, layout, std0, seed = self._placement
        std = std0 if std is None else std
        g = generator or torch.Generator(device="cpu").manual_seed(seed)
        dev, nb = self.packed.device, self.packed.shape[1]
        if dev.type == "meta":  # shape-only build (e.g. counting arb-3b): nothing to fill
            return
        a, b = self.global_start, self.global_stop
        patterns = hasher.pattern_count()
        for r0 in range(0, b, _INIT_BLOCK):
            r1 = min(layout.num_codes, r0 + _INIT_BLOCK)
            # Uniform bytes 0..242 are uniform trits: P(trit != 0) = 2/3.
            raw = torch.randint(0, packing.MAX_PACKED_BYTE + 1, (r1 - r0, nb), generator=g,
                                dtype=torch.uint8)
            if r1 <= a:  # before our rows: consume what place_trits would draw (one int32 per row and bit)
                if hasher.bits:
                    torch.randint(0, patterns, ((r1 - r0) * hasher.bits,), generator=g,
                                  dtype=torch.int32)
                continue
            trits = packing.unpack_trits(raw, self.cols)
            hasher.place_trits(trits, layout.cell_of(torch.arange(r0, r1)), g)
            lo, hi = max(r0, a), min(r1, b)
            self.packed[lo - a:hi - a] = packing.pack_trits(trits[lo - r0:hi - r0]).to(dev)
        # Scale so the rows have per-coordinate standard deviation ~std (2/3 of trits non-zero).
        self.exponent.fill_(int(packing.scale_to_exponent(torch.tensor(std / math.sqrt(2 / 3)))))
        self.t_accum.zero_()
        self.e_accum.zero_()
        self.clear_evidence()


class CodebookCommon:
    """What the codebook and its shards share: `candidate_count` validated against `num_codes`,
    the checks on lookup inputs, and the count of persistent bytes."""

    def state_bytes(self) -> int:
        """Persistent bytes held here: the matrix's (its row records whole) plus the usage
        counters."""
        return self.matrix.state_bytes() + sum(
            b.numel() * b.element_size() for n, b in self.named_buffers()
            if not n.startswith("matrix."))

    num_codes: int
    dim: int
    check_finite: bool

    def _flat_queries(self, x: torch.Tensor) -> torch.Tensor:
        """[..., dim] floats to [N, dim]; wrong type, width or NaN/inf raise before any state moves."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"codebook input must be a floating-point tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"codebook input must have last dimension {self.dim}, "
                             f"got shape {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("codebook input holds NaN or inf; refusing to look it up "
                             "(the codebook state is unchanged)")
        return x.reshape(-1, self.dim)

    @property
    def candidate_count(self) -> int:
        return self._candidate_count

    @candidate_count.setter
    def candidate_count(self, value: int) -> None:
        _check_int("candidate_count", value, 1)
        if value > self.num_codes:
            raise ValueError(f"candidate_count must be <= num_codes ({self.num_codes}), got {value}")
        self._candidate_count = value


class TernaryVQCodebook(CodebookCommon, nn.Module):
    """num_codes ternary rows of width dim; lookup by squared L2 distance.

    candidate_count: rows scored per query on the candidate path (tables above exact_max rows).
    exact_max: tables of at most this many rows are searched exhaustively (in chunks).
    cell_size: nominal rows per hash cell; a query's candidates are whole cells, so it sets the
        granularity of the partition (fixed at construction: rows are placed by it).
    beta: weight of the commitment term in `loss`.
    init_std: per-coordinate standard deviation of the initial rows.
    max_chunk_bytes: bound on the largest float temporary of a lookup ([n, rows] scores in the
        exact scan, decoded candidates in the candidate path).
    hash_seed: seeds the hash groups and the initial rows (never the global RNG).
    check_finite: reject NaN/inf inputs with ValueError before anything else (costs one host sync).
    """

    def __init__(self, num_codes: int, dim: int = 64, *, candidate_count: int = 64,
                 exact_max: int = 65_536, cell_size: int = DEFAULT_CELL_SIZE, beta: float = 0.25,
                 init_std: float = 1.0, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 hash_seed: int = 0x5EED, check_finite: bool = True,
                 device: torch.device | str | None = None, state_layout: str = "arrays") -> None:
        super().__init__()
        self.num_codes = _check_int("num_codes", num_codes, 1)
        self.dim = _check_int("dim", dim, 1)
        self.exact_max = _check_int("exact_max", exact_max, 0)
        self.cell_size = _check_int("cell_size", cell_size, 1)
        self.max_chunk_bytes = _check_int("max_chunk_bytes", max_chunk_bytes, 1)
        self.candidate_count = candidate_count          # validated by the setter
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta must be a float >= 0, got {beta!r}")
        if not (isinstance(init_std, (int, float)) and init_std > 0):
            raise ValueError(f"init_std must be a float > 0, got {init_std!r}")
        self.beta, self.check_finite, self.hash_seed = float(beta), check_finite, hash_seed
        self.hasher = SignHash(dim, hash_bits_for(num_codes, cell_size, dim), hash_seed)
        self.layout = CellLayout(num_codes, self.hasher.bits)
        self.matrix = PlacedTernaryMatrix(num_codes, dim, hasher=self.hasher, layout=self.layout,
                                          std=float(init_std), seed=hash_seed, device=device,
                                          state_layout=state_layout)
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.int32, device=device))
        self.last_lookup: dict[str, int] = {}

    # -- configuration -----------------------------------------------------------------------
    @property
    def uses_candidates(self) -> bool:
        return self.num_codes > self.exact_max

    # -- lookup ------------------------------------------------------------------------------
    @torch.no_grad()
    def lookup(self, x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        """int64 ids [...] of the nearest row per vector; mode 'auto', 'exact' or 'candidates'."""
        return self._lookup_flat(self._flat_queries(x), mode).reshape(x.shape[:-1])

    @torch.no_grad()
    def _lookup_flat(self, flat: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        if mode not in ("auto", "exact", "candidates"):
            raise ValueError(f"mode must be 'auto', 'exact' or 'candidates', got {mode!r}")
        use_cand = self.uses_candidates if mode == "auto" else mode == "candidates"
        m = self.matrix
        if use_cand:  # search_candidates quantizes (inside the fused kernel on CUDA)
            ids, fetched = lookup.search_candidates(
                flat, m.packed, m.exponent, self.dim, self.hasher, self.layout,
                self.candidate_count, self.max_chunk_bytes)
        else:
            xq, unit = lookup.quantize_queries(flat)
            ids = lookup.exact_search(xq, unit, m.packed, m.exponent, self.dim, self.max_chunk_bytes)
            fetched = self.num_codes if flat.shape[0] else 0
        self.last_lookup = {"queries": flat.shape[0], "rows_fetched": int(fetched),
                            "candidates": int(use_cand)}
        return ids

    def candidate_ids(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, C], valid [N, C]) the candidate path would score for x [..., dim]."""
        xq, _ = lookup.quantize_queries(self._flat_queries(x))
        return lookup.candidate_ids(xq, self.hasher, self.layout, self.candidate_count)

    def decode_rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rows `ids` as floats (no autograd, no evidence)."""
        return self.matrix.decode_rows(ids, dtype)

    # -- training ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> VQOutput:
        flat = self._flat_queries(x)
        ids = self._lookup_flat(flat)
        uniq, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True,
                                             return_counts=True)
        # Only the distinct chosen rows are decoded; their gradient becomes row evidence.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        # index_select: its backward (index_add) sums in a fixed order, so float evidence is
        # deterministic at any batch size (plain [inverse] indexing was not, above ~4K rows).
        q = decoded_weight(self.matrix, dtype, rows=uniq).index_select(0, inverse)
        xf = flat.to(dtype)
        denom = max(xf.numel(), 1)  # an empty batch gives zero losses, not NaN (a NaN skips the step)
        codebook_loss = (xf.detach() - q).pow(2).sum() / denom
        commitment = (xf - q.detach()).pow(2).sum() / denom
        loss = codebook_loss + self.beta * commitment
        # Straight through: the value is exactly q, the gradient w.r.t. x is the identity.
        out = q.detach().to(x.dtype) + (flat - flat.detach())
        if self.training:
            self.add_usage(uniq, counts)
        return VQOutput(out.reshape(x.shape), ids.reshape(x.shape[:-1]), loss, commitment,
                        codebook_loss)

    @torch.no_grad()
    def add_usage(self, rows: torch.Tensor, counts: torch.Tensor) -> None:
        """usage[rows] += counts (distinct rows), saturating at int32 max; touches those rows only."""
        cur = self.usage[rows].to(torch.int64)
        self.usage[rows] = (cur + counts.to(torch.int64)).clamp_max(USAGE_MAX).to(torch.int32)

    def apply_update(self, rule: TernaryRule) -> dict[str, int]:
        """Apply the rule to the rows that received evidence since the last update (sparse)."""
        return self.matrix.apply_update(rule)

    def extra_repr(self) -> str:
        path = (f"candidates={self.candidate_count}, cells=2^{self.hasher.bits}"
                if self.uses_candidates else "exact")
        return f"{self.num_codes} x {self.dim}, {path}"
