"""Where a query looks: the sign hash, the fixed row -> cell layout and the probe sequence.

A codebook of N rows is cut into M = 2**b cells of consecutive rows (cell k owns rows
[floor(k N / M), floor((k + 1) N / M)), so every cell holds floor(N/M) or ceil(N/M) rows). A query
is hashed to one of the M cells by b sign bits; it then probes its own cell and the cells reached by
flipping its least confident bits, and the rows of those cells are its candidates.

Bit j is the sign of a fixed signed sum over a group G_j of input coordinates:
    p_j = sum_{i in G_j} sigma_{j,i} x_i,    bit_j = p_j > 0,    confidence_j = |p_j|
The groups are consecutive runs of g = dim // b coordinates (G_j = [j g, (j + 1) g); the input's
coordinate order carries no meaning, so a permutation would buy nothing and costs time at init),
and the signs sigma are +-1 from a seeded CPU generator, the same in every process.
The hash reads queries that `lookup.quantize_queries` turned into integers, so p, the bits and
every probe cost are exact integers: candidate ids are a pure function of the input, whatever the
device, batch size or sharding.

Because the hash is a sum of coordinates with signs, a ternary row can be *placed* in its cell:
giving row r the signs of its cell's bits on each group puts sign(p(row r)) = bits of cell(r), so a
query that lands next to row r hashes to the cell that owns r (`place_trits`). Training then pulls
each row towards the queries that chose it, which all sit in its cell or one of the probed
neighbours, so rows stay where their cell sends queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_BITS = 62  # cell ids are int64 bit fields


@dataclass(frozen=True)
class CellLayout:
    """The fixed map between rows and cells; pure integer arithmetic, no stored table."""

    num_codes: int
    bits: int

    @property
    def num_cells(self) -> int:
        return 1 << self.bits

    @property
    def max_cell_rows(self) -> int:
        return -(-self.num_codes // self.num_cells)

    def cell_start(self, cell: torch.Tensor) -> torch.Tensor:
        """First row of each cell (int64); cell_start(M) = N."""
        return torch.div(cell * self.num_codes, self.num_cells, rounding_mode="floor")

    def cell_of(self, row: torch.Tensor) -> torch.Tensor:
        """The cell that owns each row: the largest k with cell_start(k) <= row."""
        return torch.div((row + 1) * self.num_cells - 1, self.num_codes, rounding_mode="floor")


def hash_bits_for(num_codes: int, cell_size: int, dim: int) -> int:
    """b = floor(log2(N / cell_size)), so cells hold cell_size .. 2 * cell_size rows; capped so that
    every bit has at least one coordinate of its own."""
    if num_codes <= cell_size:
        return 0
    return min(int(math.floor(math.log2(num_codes / cell_size))), dim, MAX_BITS)


class SignHash:
    """b sign bits over disjoint coordinate groups, plus multi-probe cell enumeration."""

    def __init__(self, dim: int, bits: int, seed: int) -> None:
        if not 0 <= bits <= min(dim, MAX_BITS):
            raise ValueError(f"hash bits must be in [0, {min(dim, MAX_BITS)}] for dim {dim}, got {bits}")
        self.dim, self.bits, self.seed = dim, bits, seed
        g = torch.Generator(device="cpu").manual_seed(seed)
        group = dim // bits if bits else 0
        self.group_size = group
        # coords [b, g]: the coordinates of bit j; signs [b, g] in {-1, +1}.
        self.coords = torch.arange(bits * group).reshape(bits, group)
        self.signs = (torch.randint(0, 2, (bits, group), generator=g) * 2 - 1).to(torch.int64)
        self._dev: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _signs_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        t = self._dev.get(key)
        if t is None:
            t = self._dev[key] = self.signs.to(device=device, dtype=dtype)
        return t

    def projections(self, xq: torch.Tensor) -> torch.Tensor:
        """int64 [N, b]: p_j for integer-valued float32 queries xq [N, dim]. Exact: at most dim
        terms of magnitude <= 2**Q, integers below 2**24 (see lookup.query_bits)."""
        n = xq.shape[0]
        groups = xq[:, : self.bits * self.group_size].reshape(n, self.bits, self.group_size)
        return (groups * self._signs_on(xq.device, xq.dtype)).sum(-1).to(torch.int64)

    def cells(self, p: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the cell id whose bit j is p_j > 0."""
        weights = torch.ones(self.bits, dtype=torch.int64, device=p.device) << torch.arange(
            self.bits, device=p.device)
        return ((p > 0).to(torch.int64) * weights).sum(-1)

    def probe_cells(self, p: torch.Tensor, probes: int) -> torch.Tensor:
        """int64 [N, P']: the query's cell first, then the cells whose flipped-bit sets have the
        smallest total confidence (sum of |p_j| over flipped bits); P' = min(probes, 2**m).

        Only subsets of the m = min(b, ceil(log2 P) + 1) least confident bits are considered (at
        most 2P of them): the exact P cheapest subsets of all b bits would need far more, and the
        ones left out flip a bit that is more confident than m others (m = log2 P + 2 measured
        no better: near-row recall 0.941 vs 0.937 at 1M rows, C = 64, noise 0.5). Ties go to the
        lower bit index and then to the lower subset number, so the order is a function of p alone.
        """
        dev = p.device
        base = self.cells(p)
        if probes <= 1 or self.bits == 0:
            return base[:, None]
        m = min(self.bits, math.ceil(math.log2(probes)) + 1)
        conf = p.abs()
        # Keys made unique by the index in their low bits, so the order is fully determined (no
        # reliance on sort stability): least confident bits first, then lowest bit index. Full
        # sorts of these short rows beat top-k on the GPU (bitonic sort vs radix select).
        bit_key = conf * 64 + torch.arange(self.bits, device=dev)
        order = torch.sort(bit_key, dim=1).indices[:, :m]                          # [N, m]
        conf_m = torch.gather(conf, 1, order)
        # Cost and flip mask of every subset s of those m bits (bit k of s = flip the k-th least
        # confident bit), as two small float64 products: exact, integers far below 2**53.
        member = ((torch.arange(1 << m, device=dev)[:, None] >> torch.arange(m, device=dev)) & 1)
        member = member.to(torch.float64)                                           # [2^m, m]
        cost = (conf_m.to(torch.float64) @ member.t()).to(torch.int64)              # [N, 2^m]
        masks = ((torch.ones_like(order) << order).to(torch.float64) @ member.t()).to(torch.int64)
        keys = cost * (1 << m) + torch.arange(1 << m, device=dev)
        # |p_j| <= g * 2**17 * (64 / dim) (see lookup.query_bits), so keys usually fit int32,
        # which halves the sort's work (and rows of <= 128 keys get the GPU's bitonic sort).
        if (m * self.group_size * (1 << 23) // self.dim + 1) << m < 2 ** 31:
            keys = keys.to(torch.int32)
        keep = torch.sort(keys, dim=1).indices[:, : min(probes, 1 << m)]
        return base[:, None] ^ torch.gather(masks, 1, keep)

    def place_trits(self, trits: torch.Tensor, cells: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Overwrite the hashed coordinates of int8 trits [R, dim] (CPU) so that each row hashes
        to its cell; the other coordinates keep their trits. Returned (modified in place).

        Each group gets a pattern drawn uniformly from the trit patterns whose signed sum has the
        wanted sign (the law of uniform trits conditioned on that sign).
        """
        if self.bits == 0:
            return trits
        pos = self._positive_patterns()                                          # [K, g] int8
        r = trits.shape[0]
        shifts = torch.arange(self.bits, dtype=torch.int32)
        want = ((cells.to(torch.int32)[:, None] >> shifts) & 1).to(torch.int8) * 2 - 1  # [R, b]
        pick = torch.randint(0, pos.shape[0], (r * self.bits,), generator=generator,
                             dtype=torch.int32)
        group = pos.index_select(0, pick).view(r, self.bits, -1)
        group = group * want[..., None] * self.signs.to(torch.int8)                # [R, b, g]
        trits[:, : self.bits * self.group_size] = group.reshape(r, -1)
        return trits

    def pattern_count(self) -> int:
        """How many patterns place_trits draws from (0 without hash bits)."""
        return self._positive_patterns().shape[0] if self.bits else 0

    def _positive_patterns(self) -> torch.Tensor:
        g = self.group_size
        codes = torch.arange(3 ** g)
        pats = torch.stack([(codes // 3 ** i) % 3 - 1 for i in range(g)], dim=1)
        return pats[pats.sum(1) > 0].to(torch.int8)
