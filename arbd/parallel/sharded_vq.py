"""ShardedTernaryVQCodebook: a TernaryVQCodebook whose rows are split over a process group.

Placement. Rows sit in contiguous blocks over the ranks of `group` (rank r owns rows
[bounds[r], bounds[r + 1])), balanced by default (sizes differ by at most one) or as given by
`shard_sizes`. Each rank stores only its block: packed trits, exponents, the two accumulators and
the usage counters. The hash, the cell layout and the candidate ids are arithmetic on the global
(num_codes, cell_size, hash_seed), so every rank computes them locally. A shard's initial rows
are bit-identical to the same rows of the unsharded table (the placed init is replayed for the
global row range, one 2**18-row block at a time, without keeping other ranks' rows).

Every collective call (lookup, fetch_rows, commit, update) starts with the same small
all_to_all_single of an int64 [W, 8] "meta" table: the op code, item counts per destination,
the local query count, an error code and agreement fields. Bad input on one rank is therefore
reported on every rank (ValueError) before any payload moves, and mismatched calls are caught
instead of deadlocking. Payloads use all_to_all_single with split sizes (gloo refuses the list
form with uneven sizes).

Lookup, strategy "fetch" (the default; bench/RESULTS.md has the measurements): the requester
computes its candidate ids, deduplicates them, asks each owner for its ids (int32 local offsets),
and the owners return the packed bytes + int8 exponent (14 B a row at dim 64). The requester then
scores them with the same lookup.candidate_scores / select_best as the unsharded codebook, so
ids are identical. Strategy "score": the requester sends each query (float32) to every owner of
one of its candidates; owners recompute the candidate ids, score their own rows and return the
best (id, score, row bytes); the requester keeps the lowest score, then the lowest id. The exact
path (num_codes <= exact_max) always works like "score", with every owner scanning its block.

Training has two reference semantics (`semantics`):
- "concat" (default): the ranks' batches form one global batch. The loss is divided by the
  global element count, and the result equals ONE unsharded codebook fed the concatenation
  (rank 0's rows first) in one forward. Float evidence goes to the owners per query, and each
  owner adds the contributions to a row in global query order, the order in which autograd's
  index backward adds them in the unsharded forward. Adding per-rank partial sums instead would
  round differently.
- "micro": each rank's batch is its own micro-batch (the data-parallel reference of
  ARCHITECTURE.md section 6: one codebook accumulating the ranks' batches in rank order). The loss
  is each rank's own mean. Evidence is summed per touched row on the rank itself and ships as
  row sums, or as integer votes after `commit_micro_batch` (1 B per weight on the wire).
In both, owners quantise and apply: stochastic rounding hashes the global row id, and the "norm"
scale votes use the mean over all touched rows of the table, gathered in row order, so the
result matches the unsharded rule bit for bit. Usage counts travel with the update.
docs/decisions.md ("## Sharded codebooks") gives the reasons and the numbers.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from arbd.sync_free import bin_counts
from arbd.ternary import packing
from arbd.ternary.rule import (MIN_ROW_FOR_ROW_NORM, TernaryRule, abs_mean, quantize_evidence,
                               scale_grad, scale_votes, votes_from_scale_grad)
from arbd.vq import lookup
from arbd.vq.codebook import (CodebookCommon, DEFAULT_CELL_SIZE, DEFAULT_MAX_CHUNK_BYTES, USAGE_MAX,
                              PlacedTernaryMatrix, VQOutput, _check_int)
from arbd.vq.hashing import CellLayout, SignHash, hash_bits_for

STRATEGIES = ("fetch", "score")
SEMANTICS = ("concat", "micro")
MODES = ("auto", "exact", "candidates")
EXTRA_STATE_FORMAT = 1

# Meta table columns (int64 [W, K], row w goes to rank w).
_K = 8
_OP, _COUNT, _COUNT2, _NLOCAL, _ERR, _FLAGS, _AUX, _FP = range(_K)
# Op codes: a rank that calls something else than its peers is reported, not deadlocked.
_OP_LOOKUP, _OP_FETCH, _OP_UPDATE, _OP_COMMIT, _OP_ROUTE = 1, 2, 3, 4, 5
_OP_NAMES = {1: "lookup/forward", 2: "fetch_rows/decode_rows", 3: "apply_update",
             4: "commit_micro_batch", 5: "evidence routing"}
# Lookup paths (the AUX column of a lookup).
_PATH_FETCH, _PATH_SCORE, _PATH_EXACT = 1, 2, 3
_PATH_NAMES = {1: "candidates/fetch", 2: "candidates/score", 3: "exact"}
# Error codes, with the message the other ranks see.
_ERR_INPUT, _ERR_IDS, _ERR_MODE, _ERR_RULE = 1, 2, 3, 4
_ERR_TEXT = {_ERR_INPUT: "its input was rejected (shape, dtype or NaN/inf)",
             _ERR_IDS: "it asked for row ids outside [0, num_codes)",
             _ERR_MODE: "it passed an invalid lookup mode",
             _ERR_RULE: "its update rule cannot be applied to sharded rows"}
# Update flag bits.
_F_VOTES, _F_FLOAT, _F_NONFINITE, _F_F64, _F_F32 = 1, 2, 4, 8, 16
_INT64_MAX = torch.iinfo(torch.int64).max


def shard_bounds(num_codes: int, world: int,
                 shard_sizes: Sequence[int] | None = None) -> list[int]:
    """Row boundaries [0, b_1, ..., num_codes] of the contiguous blocks of `world` ranks:
    balanced (floor(r N / W)) unless shard_sizes gives each rank's row count (each >= 1)."""
    if world > num_codes:
        raise ValueError(f"cannot shard {num_codes} rows over {world} ranks: every rank must own "
                         f"at least one row (use a smaller codebook group)")
    if shard_sizes is None:
        return [r * num_codes // world for r in range(world + 1)]
    sizes = list(shard_sizes)
    if len(sizes) != world or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                  for s in sizes) or sum(sizes) != num_codes:
        raise ValueError(f"shard_sizes must be {world} ints >= 1 summing to num_codes = "
                         f"{num_codes}, got {sizes}")
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _fingerprint(obj: Any) -> int:
    """A 63-bit digest of a JSON-able object (equal on every rank for equal objects)."""
    raw = json.dumps(obj, sort_keys=True, default=repr).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


@dataclass
class CommStats:
    """Bytes this rank handed to collectives for other ranks (its own segment is a local copy
    and not counted), split by phase. `*_total` also counts the self segment."""
    lookups: int = 0
    lookup_queries: int = 0
    lookup_bytes: int = 0
    lookup_bytes_total: int = 0
    updates: int = 0
    update_queries: int = 0
    update_bytes: int = 0
    update_bytes_total: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)

    def bytes_per_query(self) -> float:
        return self.lookup_bytes / max(1, self.lookup_queries)

    def update_bytes_per_query(self) -> float:
        return self.update_bytes / max(1, self.update_queries)


class PendingLookup:
    """A lookup whose reply (the bulk transfer) may still be in flight; see `finish`."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.done = False


class _ShardRows(torch.autograd.Function):
    """The decoded chosen rows as a differentiable tensor: backward hands their gradient to
    the codebook's evidence sink instead of returning it (there is no Parameter)."""

    @staticmethod
    def forward(ctx, anchor, packed, exponent, dim: int, dtype: torch.dtype,
                sink: Callable, key: tuple):
        ctx.sink, ctx.key = sink, key
        return packing.decode(packed, exponent, dim, dtype)

    @staticmethod
    def backward(ctx, g):
        ctx.sink(ctx.key, g)
        return (None,) * 7


class ShardedTernaryVQCodebook(CodebookCommon, nn.Module):
    """Row-sharded twin of TernaryVQCodebook; every method marked collective must be called by
    every rank of `group` in the same order (a rank with no queries passes an empty batch).

    Extra arguments over TernaryVQCodebook:
    group: the process group over which rows are split (None: the default group; without an
        initialised process group the codebook runs alone, W = 1).
    shard_sizes: rows per rank (contiguous blocks, in group-rank order); default balanced.
    strategy: "fetch" (rows travel to the requester) or "score" (queries travel to the owners).
    semantics: "concat" or "micro" (module docstring): what the sharded run is bit-identical to.
    """

    def __init__(self, num_codes: int, dim: int = 64, *, group: Any = None,
                 shard_sizes: Sequence[int] | None = None, strategy: str = "fetch",
                 semantics: str = "concat", candidate_count: int = 64, exact_max: int = 65_536,
                 cell_size: int = DEFAULT_CELL_SIZE, beta: float = 0.25, init_std: float = 1.0,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, hash_seed: int = 0x5EED,
                 check_finite: bool = True, device: torch.device | str | None = None,
                 state_layout: str = "arrays") -> None:
        super().__init__()
        self.group = group
        self._dist = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self._dist else 1
        self.rank = dist.get_rank(group) if self._dist else 0
        config = dict(num_codes=num_codes, dim=dim, shard_sizes=shard_sizes, strategy=strategy,
                      semantics=semantics, candidate_count=candidate_count, exact_max=exact_max,
                      cell_size=cell_size, beta=beta, init_std=init_std, hash_seed=hash_seed)
        # Validate locally, but raise only after every rank has compared its config: a rank
        # that raised alone would leave the others waiting in the exchange.
        err = None
        try:
            self._configure(**config)
            self.bounds = shard_bounds(num_codes, self.world, shard_sizes)
            self.max_chunk_bytes = _check_int("max_chunk_bytes", max_chunk_bytes, 1)
        except ValueError as e:
            err = str(e)
        self._agree_on_config(config, err)
        self.check_finite = check_finite
        self.row_start, self.row_stop = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.hasher = SignHash(dim, hash_bits_for(num_codes, cell_size, dim), hash_seed)
        self.layout = CellLayout(num_codes, self.hasher.bits)
        self.matrix = PlacedTernaryMatrix(self.row_stop - self.row_start, dim, hasher=self.hasher,
                                          layout=self.layout, std=float(init_std), seed=hash_seed,
                                          device=device, global_range=(self.row_start, self.row_stop),
                                          state_layout=state_layout)
        self.register_buffer("usage", torch.zeros(self.local_rows, dtype=torch.int32,
                                                  device=device))
        self._bounds_t = torch.tensor(self.bounds, dtype=torch.int64, device=device)
        self.comm = CommStats()
        self.last_lookup: dict[str, int] = {}
        self._reset_step_state()

    # -- configuration -----------------------------------------------------------------------
    def _configure(self, *, num_codes: int, dim: int, shard_sizes: Sequence[int] | None,
                   strategy: str, semantics: str, candidate_count: int, exact_max: int,
                   cell_size: int, beta: float, init_std: float, hash_seed: int) -> None:
        self.num_codes = _check_int("num_codes", num_codes, 1)
        self.dim = _check_int("dim", dim, 1)
        self.exact_max = _check_int("exact_max", exact_max, 0)
        self.cell_size = _check_int("cell_size", cell_size, 1)
        self.candidate_count = candidate_count
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta must be a float >= 0, got {beta!r}")
        if not (isinstance(init_std, (int, float)) and init_std > 0):
            raise ValueError(f"init_std must be a float > 0, got {init_std!r}")
        self.strategy, self.semantics = strategy, semantics
        self.beta, self.hash_seed = float(beta), hash_seed

    def _agree_on_config(self, config: dict[str, Any], err: str | None) -> None:
        mine = (_fingerprint(config), config, err)
        if self.world == 1 or not self._dist:
            every = [mine]
        else:
            every = [None] * self.world
            dist.all_gather_object(every, mine, group=self.group)
        differ = [r for r, (fp, _, _) in enumerate(every) if fp != every[0][0]]
        if differ:
            fields = sorted({k for r in differ for k in config
                             if every[r][1].get(k) != every[0][1].get(k)})
            detail = "; ".join(f"rank {r}: " + ", ".join(f"{k}={every[r][1][k]!r}" for k in fields)
                               for r in [0] + differ)
            raise ValueError(f"ShardedTernaryVQCodebook config differs across the ranks of the "
                             f"group (fields {fields}): {detail}")
        bad = [(r, e) for r, (_, _, e) in enumerate(every) if e]
        if bad:
            r, e = bad[0]
            raise ValueError(f"ShardedTernaryVQCodebook rejected on every rank (rank {r}): {e}")

    @property
    def local_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def uses_candidates(self) -> bool:
        return self.num_codes > self.exact_max

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Group rank that owns each global row id (ids assumed in range)."""
        return torch.searchsorted(self._bounds_t[1:], ids.contiguous(), right=True)

    # apply_ternary_update drives this module's own collective commit/update (update.py).
    ternary_evidence_owner = True

    def clear_step_evidence(self) -> None:
        """Drop this rank's evidence and usage of the step (a skipped step; or a tensor-parallel
        peer whose batch another rank of its tp group already contributes)."""
        self._reset_step_state()

    @property
    def step_nonfinite(self) -> bool:
        """Whether this rank's evidence of the step holds NaN/inf."""
        return bool(self._local_flags() & _F_NONFINITE)

    def _reset_step_state(self) -> None:
        self._tag = 0                       # forwards since the last update (same on all ranks)
        self._queries = 0                   # this rank's queries since the last update
        self._pending: list[dict[str, Any]] = []     # captured float evidence, by forward
        self._usage_pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._votes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # micro, local
        self._owner_votes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # concat
        self._nonfinite = False

    @property
    def has_evidence(self) -> bool:
        return bool(self._pending) or bool(self._votes) or bool(self._owner_votes)

    # -- collectives ---------------------------------------------------------------------------
    def _count(self, phase: str, rows_per_dest: Sequence[int], row_bytes: int) -> tuple[int, int]:
        total = sum(rows_per_dest) * row_bytes
        remote = total - rows_per_dest[self.rank] * row_bytes
        self.comm.by_phase[phase] = self.comm.by_phase.get(phase, 0) + remote
        return remote, total

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
             in_splits: list[int] | None, async_op: bool = False) -> Any:
        if self.world == 1:
            out.copy_(inp)
            return None
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group,
                                      async_op=async_op)

    def _exchange_meta(self, op: int, counts: torch.Tensor | None = None,
                       counts2: torch.Tensor | None = None, *, n_local: int = 0, err: int = 0,
                       err_msg: str = "", flags: int = 0, aux: int = 0, fp: int = 0,
                       phase: str) -> torch.Tensor:
        """All-to-all of the [W, K] meta table; raises on every rank if any rank reported an
        error or called a different operation. Returns the table received (row s from rank s)."""
        meta = torch.zeros(self.world, _K, dtype=torch.int64)
        meta[:, _OP], meta[:, _NLOCAL], meta[:, _ERR] = op, n_local, err
        meta[:, _FLAGS], meta[:, _AUX], meta[:, _FP] = flags, aux, fp
        if counts is not None:
            meta[:, _COUNT] = counts.cpu()
        if counts2 is not None:
            meta[:, _COUNT2] = counts2.cpu()
        out = torch.empty_like(meta)
        self._a2a(out, meta, None, None)
        remote, total = self._count(phase, [1] * self.world, _K * 8)
        self._charge(phase, remote, total)
        ops = out[:, _OP]
        if bool((ops != op).any()):
            calls = ", ".join(f"rank {r}: {_OP_NAMES.get(int(o), int(o))}" for r, o in enumerate(ops))
            raise RuntimeError(f"sharded codebook collectives called out of step ({calls}); "
                               f"every rank of the group must make the same calls in order")
        errs = out[:, _ERR]
        if bool(errs.any()):
            if err:
                raise ValueError(err_msg + " (reported to every rank of the codebook group; "
                                 "nothing was changed)")
            r = int(torch.nonzero(errs)[0, 0])
            raise ValueError(f"sharded codebook call refused on every rank: rank {r}: "
                             f"{_ERR_TEXT.get(int(errs[r]), 'error')}; nothing was changed")
        return out

    def _charge(self, phase: str, remote: int, total: int) -> None:
        if phase.startswith("lookup"):
            self.comm.lookup_bytes += remote
            self.comm.lookup_bytes_total += total
        else:
            self.comm.update_bytes += remote
            self.comm.update_bytes_total += total

    def _payload(self, out_rows: list[int], in_rows: list[int], inp: torch.Tensor,
                 width_dtype: tuple[tuple[int, ...], torch.dtype], phase: str,
                 async_op: bool = False) -> tuple[torch.Tensor, Any]:
        """all_to_all_single of row records; returns (output, work or None)."""
        tail, dtype = width_dtype
        out = torch.empty((sum(out_rows),) + tail, dtype=dtype, device=inp.device)
        row_bytes = math.prod(tail) * torch.empty(0, dtype=dtype).element_size()
        self._charge(phase, *self._count(phase, in_rows, row_bytes))
        work = self._a2a(out, inp, out_rows, in_rows, async_op=async_op)
        return out, work

    # -- lookup --------------------------------------------------------------------------------
    def candidate_ids(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, C], valid [N, C]) the candidate path scores for x; local, no communication."""
        xq, _ = lookup.quantize_queries(self._flat_queries(x))
        return lookup.candidate_ids(xq, self.hasher, self.layout, self.candidate_count)

    def _cand(self, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if xq.shape[0] == 0:
            z = torch.zeros(0, self.candidate_count, dtype=torch.int64, device=xq.device)
            return z, z.bool()
        return lookup.candidate_ids(xq, self.hasher, self.layout, self.candidate_count)

    def start_lookup(self, x: torch.Tensor, mode: str = "auto") -> PendingLookup:
        """Collective. Plans the lookup, exchanges requests and serves the other ranks, then
        issues the reply transfer asynchronously; `finish(handle)` waits and scores."""
        flat, err, msg, path = None, 0, "", 0
        try:
            flat = self._flat_queries(x)
        except ValueError as e:
            err, msg = _ERR_INPUT, str(e)
        if not err and mode not in MODES:
            err, msg = _ERR_MODE, f"mode must be 'auto', 'exact' or 'candidates', got {mode!r}"
        if not err:
            cand = self.uses_candidates if mode == "auto" else mode == "candidates"
            path = (_PATH_FETCH if self.strategy == "fetch" else _PATH_SCORE) if cand else _PATH_EXACT
        dev = self.matrix.packed.device
        n = 0 if err else flat.shape[0]
        h = PendingLookup(shape=None if err else tuple(x.shape[:-1]), path=path, n=n,
                          x_dtype=None if err else x.dtype, flat=flat)
        if n:
            h.xq, h.unit = lookup.quantize_queries(flat)
        else:
            h.xq = torch.zeros(0, self.dim, device=dev)
            h.unit = torch.zeros(0, device=dev)
        send_counts = torch.zeros(self.world, dtype=torch.int64)
        if path in (_PATH_FETCH, _PATH_SCORE):
            h.ids, h.valid = self._cand(h.xq)
        if path == _PATH_FETCH:
            uniq, inv = torch.unique(h.ids.reshape(-1), sorted=True, return_inverse=True)
            h.uniq, h.inv = uniq, inv.reshape(h.ids.shape)
            owner = self.owner_of(uniq)
            send_counts = bin_counts(owner, self.world).cpu()
            request = (uniq - self._bounds_t[owner]).to(torch.int32)
        elif path in (_PATH_SCORE, _PATH_EXACT):
            if path == _PATH_SCORE:
                # Each query goes to every owner of at least one of its valid candidates.
                owners = self.owner_of(h.ids)
                qi = torch.arange(n, device=dev)[:, None].expand_as(owners)
                present = torch.zeros(n, self.world, dtype=torch.bool, device=dev)
                present[qi[h.valid], owners[h.valid]] = True
            else:
                present = torch.ones(n, self.world, dtype=torch.bool, device=dev)
            pairs = present.t().nonzero()                        # (owner, query), owner-major
            h.pair_owner, h.pair_query = pairs[:, 0], pairs[:, 1]
            send_counts = present.sum(0).cpu()
            request = flat.detach().to(torch.float32)[h.pair_query] if n else \
                torch.zeros(0, self.dim, device=dev)
        meta = self._exchange_meta(_OP_LOOKUP, send_counts, n_local=n, err=err, err_msg=msg,
                                   aux=path, phase="lookup_meta")
        paths = meta[:, _AUX]
        if bool((paths != path).any()):
            names = ", ".join(f"rank {r}: {_PATH_NAMES[int(p)]}" for r, p in enumerate(paths))
            raise ValueError(f"ranks chose different lookup paths ({names}); pass the same mode "
                             f"and strategy on every rank")
        h.n_global = int(meta[:, _NLOCAL].sum())
        recv_counts = meta[:, _COUNT].tolist()
        sends = send_counts.tolist()
        h.send_counts = sends
        nb = packing.packed_cols(self.dim)
        if path == _PATH_FETCH:
            asked, _ = self._payload(recv_counts, sends, request, ((), torch.int32), "lookup_ids")
            served = self._serve_rows(asked.long())
            h.reply, h.work = self._payload(sends, recv_counts, served, ((nb + 1,), torch.uint8),
                                            "lookup_rows", async_op=True)
        else:
            asked, _ = self._payload(recv_counts, sends, request, ((self.dim,), torch.float32),
                                     "lookup_queries")
            served = self._serve_scores(asked, path == _PATH_EXACT)
            h.reply, h.work = self._payload(sends, recv_counts, served, ((nb + 9,), torch.uint8),
                                            "lookup_results", async_op=True)
        h.served = served                                    # kept alive until the send is done
        self.comm.lookups += 1
        self.comm.lookup_queries += n
        self.last_lookup = {"queries": n, "rows_fetched": int(h.uniq.numel()) if path == _PATH_FETCH
                            else 0, "pairs": int(sum(sends)) if path != _PATH_FETCH else 0,
                            "candidates": int(path != _PATH_EXACT)}
        return h

    def _serve_rows(self, local: torch.Tensor) -> torch.Tensor:
        """uint8 [M, nb + 1]: packed bytes then the int8 exponent of each requested local row."""
        m = self.matrix
        return torch.cat([m.packed[local], m.exponent[local].view(torch.uint8)[:, None]], 1)

    def _serve_scores(self, queries: torch.Tensor, exact: bool) -> torch.Tensor:
        """Score received queries against this block; uint8 [M, 8 + nb + 1] records of
        (int32 local id, float32 score, packed row, exponent) for each query's best own row."""
        m, n = self.matrix, queries.shape[0]
        nb = packing.packed_cols(self.dim)
        if n == 0:
            return torch.zeros(0, nb + 9, dtype=torch.uint8, device=queries.device)
        xq, unit = lookup.quantize_queries(queries)
        if exact:
            local = lookup.exact_search(xq, unit, m.packed, m.exponent, self.dim, self.max_chunk_bytes)
            score = lookup.candidate_scores(xq, unit, m.packed[local][:, None],
                                            m.exponent[local][:, None])[:, 0]
        else:
            per_query = nb * (256 * 4 + self.candidate_count * 8 * 3)
            block = max(1, min(n, self.max_chunk_bytes // per_query))
            locs, scores = [], []
            for a in range(0, n, block):
                ids, valid = self._cand(xq[a:a + block])
                own = valid & (ids >= self.row_start) & (ids < self.row_stop)
                loc = (ids - self.row_start).clamp(0, self.local_rows - 1)
                s = lookup.candidate_scores(xq[a:a + block], unit[a:a + block], m.packed[loc],
                                            m.exponent[loc], own)
                best, bs = lookup.select_best(s, ids)
                locs.append(best - self.row_start)
                scores.append(bs)
            local, score = torch.cat(locs), torch.cat(scores)
        return torch.cat([local.to(torch.int32).view(torch.uint8).reshape(n, 4),
                          score.to(torch.float32).view(torch.uint8).reshape(n, 4),
                          m.packed[local], m.exponent[local].view(torch.uint8)[:, None]], 1)

    def _resolve(self, h: PendingLookup) -> None:
        """Wait for the reply and pick each query's row: h.best [N], h.best_packed, h.best_exp."""
        if h.done:
            return
        if h.work is not None:
            h.work.wait()
        nb = packing.packed_cols(self.dim)
        dev = h.xq.device
        if h.path == _PATH_FETCH:
            rows = h.reply[:, :nb]
            exps = _bytes_as(h.reply[:, nb], torch.int8)
            n = h.n
            per_query = nb * (256 * 4 + self.candidate_count * 8 * 3)
            block = max(1, min(max(n, 1), self.max_chunk_bytes // per_query))
            best = []
            for a in range(0, n, block):
                inv = h.inv[a:a + block]
                s = lookup.candidate_scores(h.xq[a:a + block], h.unit[a:a + block], rows[inv],
                                            exps[inv], h.valid[a:a + block])
                best.append(lookup.select_best(s, h.ids[a:a + block])[0])
            h.best = torch.cat(best) if best else torch.zeros(0, dtype=torch.int64, device=dev)
            pos = torch.searchsorted(h.uniq, h.best)
            h.best_packed, h.best_exp = rows[pos], exps[pos]
        else:
            rec = h.reply
            p = rec.shape[0]
            local = _bytes_as(rec[:, 0:4], torch.int32).reshape(p).long()
            score = _bytes_as(rec[:, 4:8], torch.float32).reshape(p)
            gid = local + self._bounds_t[h.pair_owner]
            scores = torch.full((h.n, self.world), math.inf, dtype=torch.float32, device=dev)
            ids = torch.full((h.n, self.world), _INT64_MAX, dtype=torch.int64, device=dev)
            scores[h.pair_query, h.pair_owner] = score
            ids[h.pair_query, h.pair_owner] = gid
            h.best = lookup.select_best(scores, ids)[0]
            win = gid == h.best[h.pair_query]                  # exactly one pair per query
            h.best_packed = torch.zeros(h.n, nb, dtype=torch.uint8, device=dev)
            h.best_exp = torch.zeros(h.n, dtype=torch.int8, device=dev)
            h.best_packed[h.pair_query[win]] = rec[win, 8:8 + nb]
            h.best_exp[h.pair_query[win]] = _bytes_as(rec[win, 8 + nb], torch.int8)
        h.done = True
        h.reply = h.served = h.work = None

    def finish(self, h: PendingLookup) -> torch.Tensor:
        """int64 ids [...] of a started lookup (local; waits for its transfer)."""
        self._resolve(h)
        return h.best.reshape(h.shape)

    @torch.no_grad()
    def lookup(self, x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        """Collective. int64 ids [...] of the nearest row per vector, as the unsharded codebook."""
        return self.finish(self.start_lookup(x, mode))

    def fetch_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective. (packed uint8 [..., nb], exponent int8 [...]) of global row ids."""
        err, msg = 0, ""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() \
                or ids.dtype == torch.bool:
            got = getattr(ids, "dtype", type(ids).__name__)
            err, msg = _ERR_IDS, f"row ids must be an integer tensor, got {got}"
        elif ids.numel():
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()   # one readback, not two
            if lo < 0 or hi >= self.num_codes:
                err, msg = _ERR_IDS, (f"row ids must be in [0, {self.num_codes}), got values in "
                                      f"[{lo}, {hi}]")
        dev = self.matrix.packed.device
        flat = torch.zeros(0, dtype=torch.int64, device=dev) if err else ids.reshape(-1).long()
        uniq, inv = torch.unique(flat, sorted=True, return_inverse=True)
        owner = self.owner_of(uniq)
        sends = bin_counts(owner, self.world).cpu()
        meta = self._exchange_meta(_OP_FETCH, sends, err=err, err_msg=msg, phase="lookup_meta")
        recv, sends = meta[:, _COUNT].tolist(), sends.tolist()
        asked, _ = self._payload(recv, sends, (uniq - self._bounds_t[owner]).to(torch.int32),
                                 ((), torch.int32), "lookup_ids")
        nb = packing.packed_cols(self.dim)
        got, _ = self._payload(sends, recv, self._serve_rows(asked.long()), ((nb + 1,), torch.uint8),
                               "lookup_rows")
        rows = got[inv]
        return (rows[:, :nb].reshape(*ids.shape, nb),
                _bytes_as(rows[:, nb], torch.int8).reshape(ids.shape))

    def decode_rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Collective. The rows `ids` as floats (no autograd, no evidence)."""
        packed, exps = self.fetch_rows(ids)
        return packing.decode(packed, exps, self.dim, dtype)

    # -- training ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> VQOutput:
        """Collective. VQOutput as TernaryVQCodebook; `loss` is this rank's share: with
        semantics 'concat' the sum over ranks of `loss` is the global-batch loss."""
        return self.forward_pending(self.start_lookup(x))

    def forward_pending(self, h: PendingLookup) -> VQOutput:
        """The forward of a lookup started with `start_lookup(x)` (x is the handle's input)."""
        self._resolve(h)
        flat, ids = h.flat, h.best
        tag = self._tag
        self._tag += 1
        self._queries += h.n
        uniq, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True,
                                             return_counts=True)
        first = torch.full((uniq.numel(),), max(h.n, 1), dtype=torch.int64, device=ids.device)
        first = first.scatter_reduce(0, inverse, torch.arange(h.n, device=ids.device), "amin")
        u_packed, u_exp = h.best_packed[first], h.best_exp[first]
        dtype = torch.float64 if h.x_dtype == torch.float64 else torch.float32
        if not torch.is_grad_enabled():
            q = packing.decode(u_packed, u_exp, self.dim, dtype)[inverse]
        elif self.semantics == "concat":
            # One output row per query: backward hands over per-query gradients, which the
            # owners add in global query order.
            key = ("query", tag, ids, None, None)
            q = _ShardRows.apply(_anchor(ids.device), h.best_packed, h.best_exp, self.dim, dtype,
                                 self._capture, key)
        else:
            # One output row per distinct id, indexed as the unsharded forward does, so autograd
            # folds this rank's gradients exactly as it would for this micro-batch alone.
            key = ("row", tag, uniq, u_packed, u_exp)
            q = _ShardRows.apply(_anchor(ids.device), u_packed, u_exp, self.dim, dtype,
                                 self._capture, key).index_select(0, inverse)
        xf = flat.to(dtype)
        count = h.n_global if self.semantics == "concat" else h.n
        denom = max(count * self.dim, 1)
        codebook_loss = (xf.detach() - q).pow(2).sum() / denom
        commitment = (xf - q.detach()).pow(2).sum() / denom
        loss = codebook_loss + self.beta * commitment
        out = q.detach().to(h.x_dtype) + (flat - flat.detach())
        if self.training and uniq.numel():
            self._usage_pending.append((uniq, counts))
        return VQOutput(out.reshape(h.shape + (self.dim,)), ids.reshape(h.shape), loss,
                        commitment, codebook_loss)

    def _capture(self, key: tuple, g: torch.Tensor) -> None:
        kind, tag, gids, packed, exps = key
        if gids.numel():
            g = g.detach()
            g = g if g.dtype == torch.float64 else g.to(torch.float32)
            self._pending.append(dict(kind=kind, tag=tag, gids=gids, g=g, packed=packed, exps=exps))

    # Local evidence of this rank, merged as TernaryMatrix.evidence() merges micro-batches.
    def _local_rows(self) -> tuple[torch.Tensor | None, torch.Tensor | None, list[dict]]:
        entries = sorted(self._pending, key=lambda e: e["tag"])
        if not entries:
            return None, None, entries
        idx = torch.cat([e["gids"] for e in entries])
        rows = torch.cat([e["g"] for e in entries])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        merged = torch.zeros(uniq.numel(), self.dim, dtype=rows.dtype, device=rows.device)
        merged.index_add_(0, inverse, rows)
        return uniq, merged, entries

    @torch.no_grad()
    def commit_micro_batch(self, rule: TernaryRule) -> None:
        """Quantise the float evidence collected since the last commit into integer votes.
        'micro': local (this rank's batch is the micro-batch; no communication). 'concat':
        collective (the global batch is the micro-batch; the owners quantise)."""
        if self.semantics == "micro":
            self._commit_local(rule)
            return
        flags = self._local_flags()
        meta = self._exchange_meta(_OP_COMMIT, flags=flags, fp=_fingerprint(repr(rule)),
                                   phase="update_meta")
        self._check_agreement(meta, rule)
        all_flags = [int(f) for f in meta[:, _FLAGS]]
        if not any(f & _F_FLOAT for f in all_flags):
            return
        idx, g = self._route(rule, "query", _dtype_of(all_flags))
        self._owner_quantize(idx, g, rule)

    def _commit_local(self, rule: TernaryRule) -> None:
        gids, g, entries = self._local_rows()
        self._pending = []
        if g is None:
            return
        if not bool(torch.isfinite(g).all()):
            self._nonfinite = True
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        # The rows' trits and exponents came with the lookup (rows do not change before the
        # update), so the scale votes need no fetch.
        cat_ids = torch.cat([e["gids"] for e in entries])
        order = torch.argsort(cat_ids, stable=True)
        pos = order[torch.searchsorted(cat_ids[order], gids)]
        packed = torch.cat([e["packed"] for e in entries])[pos]
        exps = torch.cat([e["exps"] for e in entries])[pos]
        trits = packing.unpack_trits(packed, self.dim)
        q = quantize_evidence(g, rule, row_ids=gids).to(torch.int32)
        ev = scale_votes(g, trits, exps, rule, gids).to(torch.int32)
        self._votes.append((gids, q, ev))

    def _local_flags(self) -> int:
        f = 0
        if self._votes or self._owner_votes:
            f |= _F_VOTES
        if self._pending:
            f |= _F_FLOAT
            if any(e["g"].dtype == torch.float64 for e in self._pending):
                f |= _F_F64
            if any(e["g"].dtype != torch.float64 for e in self._pending):
                f |= _F_F32
            finite = torch.stack([torch.isfinite(e["g"]).all() for e in self._pending])
            if not bool(finite.all()):   # one readback for all pending evidence
                f |= _F_NONFINITE
        if self._nonfinite:
            f |= _F_NONFINITE
        return f

    def _check_agreement(self, meta: torch.Tensor, rule: TernaryRule) -> None:
        fps = meta[:, _FP]
        if bool((fps != fps[0]).any()):
            raise ValueError(f"ranks passed different update rules (this rank: {rule}); every rank "
                             f"of the codebook group must apply the same rule")
        if self.world > 1 and (rule.norm != "row" or self.dim < MIN_ROW_FOR_ROW_NORM):
            raise ValueError("sharded codebooks need per-row evidence normalisation (rule.norm "
                             f"'row' and dim >= {MIN_ROW_FOR_ROW_NORM}); got norm={rule.norm!r}, "
                             f"dim={self.dim}: a tensor-wide mean would need every touched row "
                             "on every rank")
        flags = [int(f) for f in meta[:, _FLAGS]]
        if any(f & _F_F64 for f in flags) and any(f & _F_F32 for f in flags):
            raise ValueError("ranks hold float32 and float64 evidence in the same step; feed the "
                             "codebook one input dtype on every rank")

    @torch.no_grad()
    def apply_update(self, rule: TernaryRule) -> dict[str, int]:
        """Collective. Route usage and evidence to the owners and apply the rule to the touched
        rows there. A step whose evidence is non-finite on any rank is skipped on every rank
        (usage is still counted), as the model-wide update does."""
        meta = self._exchange_meta(_OP_UPDATE, flags=self._local_flags(),
                                   fp=_fingerprint(repr(rule)), phase="update_meta")
        self._check_agreement(meta, rule)
        self.comm.updates += 1
        self.comm.update_queries += self._queries
        all_flags = [int(f) for f in meta[:, _FLAGS]]
        any_votes = any(f & _F_VOTES for f in all_flags)
        any_float = any(f & _F_FLOAT for f in all_flags)
        skip = any(f & _F_NONFINITE for f in all_flags)
        stats = {"trit_flips": 0, "scale_moves": 0, "rows": 0, "skipped": int(skip)}
        try:
            if skip or not (any_votes or any_float):
                self._route(rule, "none", torch.float32)
            elif self.semantics == "micro":
                if any_votes:
                    self._commit_local(rule)      # pending float = the step's last micro-batch
                    idx, v, e = self._route(rule, "votes", torch.float32)
                    stats.update(self._owner_apply_votes(idx, v, e, rule))
                else:
                    idx, g = self._route(rule, "row", _dtype_of(all_flags))
                    stats.update(self._owner_apply_float(idx, g, rule))
            elif any_votes:
                if any_float:
                    idx, g = self._route(rule, "query", _dtype_of(all_flags))
                    self._owner_quantize(idx, g, rule)
                else:
                    self._route(rule, "none", torch.float32)
                stats.update(self._owner_apply_owner_votes(rule))
            else:
                idx, g = self._route(rule, "query", _dtype_of(all_flags))
                stats.update(self._owner_apply_float(idx, g, rule))
        finally:
            self._reset_step_state()
        return stats

    # -- routing to owners ---------------------------------------------------------------------
    def _route(self, rule: TernaryRule, kind: str, fdtype: torch.dtype) -> tuple | None:
        """Send pending usage and the evidence of `kind` to the owners ('none', 'query', 'row',
        'votes'); apply the usage received; return the evidence this rank owns, merged."""
        dev = self.matrix.packed.device
        # Usage: per touched row, this rank's count (exact integers, any order).
        if self._usage_pending:
            ui = torch.cat([u for u, _ in self._usage_pending])
            uc = torch.cat([c for _, c in self._usage_pending])
            u_ids, u_inv = torch.unique(ui, sorted=True, return_inverse=True)
            u_cnt = torch.zeros(u_ids.numel(), dtype=torch.int64, device=dev).index_add_(0, u_inv, uc)
            self._usage_pending = []
        else:
            u_ids = torch.zeros(0, dtype=torch.int64, device=dev)
            u_cnt = torch.zeros(0, dtype=torch.int64, device=dev)
        u_own = self.owner_of(u_ids)
        u_rec = torch.stack([(u_ids - self._bounds_t[u_own]).to(torch.int32),
                             u_cnt.clamp_max(USAGE_MAX).to(torch.int32)], 1)
        u_counts = bin_counts(u_own, self.world)
        # Evidence records, ordered by owner (stable: keeps tag then query/row order).
        e_ids, e_tag, e_val = self._evidence_records(kind, fdtype)
        e_own = self.owner_of(e_ids)
        order = torch.argsort(e_own, stable=True)
        e_ids, e_tag, e_val, e_own = e_ids[order], e_tag[order], e_val[order], e_own[order]
        e_counts = bin_counts(e_own, self.world)
        e_counts, u_counts = torch.stack([e_counts, u_counts]).cpu()   # one readback, not two
        bound = int(e_val.abs().max()) if kind == "votes" and e_val.numel() else 0
        meta = self._exchange_meta(_OP_ROUTE, e_counts, u_counts, aux=bound, phase="update_meta")
        if kind == "votes":
            gb = int(meta[:, _AUX].max())
            vdtype = torch.int8 if gb <= 127 else torch.int16 if gb <= 32767 else torch.int32
            e_val = e_val.to(vdtype)
            head = (e_ids - self._bounds_t[e_own]).to(torch.int32)[:, None]
        else:
            e_val = e_val.to(fdtype)
            head = torch.stack([(e_ids - self._bounds_t[e_own]).to(torch.int32),
                                e_tag.to(torch.int32)], 1)
        rec_w = head.shape[1] * 4 + e_val.shape[1] * e_val.element_size()
        e_bytes = torch.cat([_bytes_as(head, torch.uint8),
                             _bytes_as(e_val, torch.uint8)], 1)
        u_bytes = _bytes_as(u_rec, torch.uint8)
        # One uint8 buffer: for each destination its usage records, then its evidence records.
        uo = [0] + torch.cumsum(u_counts, 0).tolist()
        eo = [0] + torch.cumsum(e_counts, 0).tolist()
        send = torch.cat([torch.cat([u_bytes[uo[w]:uo[w + 1]].reshape(-1),
                                     e_bytes[eo[w]:eo[w + 1]].reshape(-1)])
                          for w in range(self.world)])
        send_b = [(uo[w + 1] - uo[w]) * 8 + (eo[w + 1] - eo[w]) * rec_w for w in range(self.world)]
        r_u, r_e = meta[:, _COUNT2].tolist(), meta[:, _COUNT].tolist()
        recv_b = [r_u[s] * 8 + r_e[s] * rec_w for s in range(self.world)]
        got, _ = self._payload(recv_b, send_b, send, ((), torch.uint8), "update_payload")
        # Split what arrived by source, in rank order.
        us, es, off = [], [], 0
        for s in range(self.world):
            us.append(got[off:off + r_u[s] * 8])
            off += r_u[s] * 8
            es.append(got[off:off + r_e[s] * rec_w])
            off += r_e[s] * rec_w
        self._apply_usage(torch.cat(us).view(torch.int32).reshape(-1, 2))
        recs = torch.cat(es).reshape(-1, rec_w)
        if kind == "none":
            return None
        if kind == "votes":
            rows = _bytes_as(recs[:, :4], torch.int32).reshape(-1).long()
            vals = _bytes_as(recs[:, 4:], e_val.dtype).reshape(-1, self.dim + 1).to(torch.int32)
            return self._merge_votes(rows, vals[:, :self.dim], vals[:, self.dim])
        head_r = _bytes_as(recs[:, :8], torch.int32).reshape(-1, 2).long()
        vals = _bytes_as(recs[:, 8:], fdtype).reshape(-1, self.dim)
        if kind == "row":
            # Entries arrive rank-major and, within a rank, in tag order: the order in which the
            # reference merges the micro-batches' row gradients.
            return _merge_rows(head_r[:, 0], vals, self.dim)
        # Per query: fold each forward's contributions in global query order (stable sort by
        # tag keeps rank order, then query order), then merge forwards in tag order.
        order = torch.argsort(head_r[:, 1], stable=True)
        rows, tags, vals = head_r[order, 0], head_r[order, 1], vals[order]
        parts_i, parts_v = [], []
        for t in torch.unique(tags).tolist():
            sel = tags == t
            u, inv = torch.unique(rows[sel], sorted=True, return_inverse=True)
            parts_i.append(u)
            parts_v.append(torch.zeros(u.numel(), self.dim, dtype=vals.dtype,
                                       device=vals.device).index_add_(0, inv, vals[sel]))
        if not parts_i:
            return rows[:0], vals[:0]
        return _merge_rows(torch.cat(parts_i), torch.cat(parts_v), self.dim)

    def _evidence_records(self, kind: str, fdtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.matrix.packed.device
        if kind == "votes":
            self._pending = []
            if not self._votes:
                z = torch.zeros(0, dtype=torch.int64, device=dev)
                return z, z, torch.zeros(0, self.dim + 1, dtype=torch.int32, device=dev)
            ids, v, e = _merge_int(self._votes, self.dim)
            self._votes = []
            return ids, torch.zeros_like(ids), torch.cat([v, e[:, None]], 1)
        entries = sorted(self._pending, key=lambda e: e["tag"]) if kind != "none" else []
        self._pending = [] if kind != "none" else self._pending
        if not entries:
            return (torch.zeros(0, dtype=torch.int64, device=dev),
                    torch.zeros(0, dtype=torch.int64, device=dev),
                    torch.zeros(0, self.dim, dtype=fdtype, device=dev))
        ids = torch.cat([e["gids"] for e in entries])
        tags = torch.cat([torch.full_like(e["gids"], e["tag"]) for e in entries])
        return ids, tags, torch.cat([e["g"].to(fdtype) for e in entries])

    def _apply_usage(self, rec: torch.Tensor) -> None:
        if rec.shape[0] == 0:
            return
        rows, inv = torch.unique(rec[:, 0].long(), sorted=True, return_inverse=True)
        tot = torch.zeros(rows.numel(), dtype=torch.int64, device=rec.device)
        tot.index_add_(0, inv, rec[:, 1].long())
        # Adding the sum once equals adding per step with saturation (counts are >= 0).
        self.usage[rows] = (self.usage[rows].long() + tot).clamp_max(USAGE_MAX).to(torch.int32)

    def _merge_votes(self, rows: torch.Tensor, v: torch.Tensor, e: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rows.numel() == 0:
            return rows, v, e
        uniq, inv = torch.unique(rows, sorted=True, return_inverse=True)
        vv = torch.zeros(uniq.numel(), self.dim, dtype=torch.int32, device=v.device).index_add_(0, inv, v)
        ee = torch.zeros(uniq.numel(), dtype=torch.int32, device=e.device).index_add_(0, inv, e)
        return uniq, vv, ee

    # -- owner side: quantise and apply --------------------------------------------------------
    def _rows_of(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.matrix
        return packing.unpack_trits(m.packed[idx], self.dim), m.exponent[idx]

    def _scale_votes(self, g: torch.Tensor, trits: torch.Tensor, exps: torch.Tensor,
                     rule: TernaryRule, gids: torch.Tensor) -> torch.Tensor:
        """rule.scale_votes, with the 'norm' mean taken over the touched rows of every shard:
        the owners' dL/dE values are gathered in rank (= row) order, which is the vector the
        unsharded rule averages, so the mean is bit-identical. Collective for 'norm' at W > 1."""
        if not (rule.learn_scales and rule.scale_mode == "norm" and self.world > 1):
            return scale_votes(g, trits, exps, rule, gids)
        g_e = scale_grad(g, trits, exps)
        every = self._gather_in_rank_order(g_e)
        return votes_from_scale_grad(g_e, rule, gids, abs_mean(every))

    def _gather_in_rank_order(self, t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.numel()], dtype=torch.int64)
        ns = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(ns, n, group=self.group)
        ns = [int(v) for v in ns]
        pad = torch.zeros(max(ns), dtype=t.dtype, device=t.device)
        pad[:t.numel()] = t
        outs = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(outs, pad, group=self.group)
        b = (self.world - 1) * (8 + pad.numel() * pad.element_size())
        self.comm.update_bytes += b
        self.comm.update_bytes_total += b + 8 + pad.numel() * pad.element_size()
        self.comm.by_phase["update_gather"] = self.comm.by_phase.get("update_gather", 0) + b
        return torch.cat([o[:k] for o, k in zip(outs, ns)])

    def _owner_quantize(self, idx: torch.Tensor, g: torch.Tensor, rule: TernaryRule) -> None:
        """'concat' commit at the owner: the global micro-batch's votes for this block."""
        if not bool(torch.isfinite(g).all()):
            self._nonfinite = True
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        trits, exps = self._rows_of(idx)
        gids = idx + self.row_start
        q = quantize_evidence(g, rule, row_ids=gids).to(torch.int32)
        ev = self._scale_votes(g, trits, exps, rule, gids).to(torch.int32)
        if idx.numel():
            self._owner_votes.append((idx, q, ev))

    def _owner_apply_float(self, idx: torch.Tensor, g: torch.Tensor,
                           rule: TernaryRule) -> dict[str, int]:
        trits, exps = self._rows_of(idx)
        gids = idx + self.row_start
        q = quantize_evidence(g, rule, row_ids=gids)
        ev = self._scale_votes(g, trits, exps, rule, gids)
        return self._write(idx, q, ev, rule)

    def _owner_apply_votes(self, idx: torch.Tensor, v: torch.Tensor, e: torch.Tensor,
                           rule: TernaryRule) -> dict[str, int]:
        return self._write(idx, v, e, rule)

    def _owner_apply_owner_votes(self, rule: TernaryRule) -> dict[str, int]:
        if not self._owner_votes:
            return {"trit_flips": 0, "scale_moves": 0, "rows": 0}
        idx, v, e = _merge_int(self._owner_votes, self.dim)
        return self._owner_apply_votes(idx, v, e, rule)

    def _write(self, idx: torch.Tensor, v: torch.Tensor, e: torch.Tensor,
               rule: TernaryRule) -> dict[str, int]:
        """Apply integer votes to the owned rows `idx` through the matrix's own read-modify-write."""
        if idx.numel() == 0:
            return {"trit_flips": 0, "scale_moves": 0, "rows": 0}
        return self.matrix.apply_row_votes(idx, v, e, rule)

    # -- checkpoints ---------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT, "num_codes": self.num_codes, "dim": self.dim,
                "row_start": self.row_start, "row_stop": self.row_stop, "rank": self.rank,
                "world": self.world, "bounds": list(self.bounds), "hash_seed": self.hash_seed,
                "cell_size": self.cell_size}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self._check_extra_state(state)

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        want = (self.num_codes, self.dim, self.row_start, self.row_stop, self.hash_seed,
                self.cell_size)
        got = tuple(state.get(k) for k in ("num_codes", "dim", "row_start", "row_stop",
                                           "hash_seed", "cell_size"))
        if got != want:
            raise ValueError(f"checkpoint shard holds rows [{got[2]}, {got[3]}) of a "
                             f"{got[0]} x {got[1]} codebook (hash_seed {got[4]}, cell_size "
                             f"{got[5]}); this rank owns rows [{want[2]}, {want[3]}) of "
                             f"{want[0]} x {want[1]} (hash_seed {want[4]}, cell_size {want[5]})")

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              local_metadata: dict, strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # Check the row range before any buffer is overwritten.
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_extra_state(state_dict[key])
        elif strict:
            raise ValueError(f"sharded codebook state has no {key!r}: cannot tell which rows it holds")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        path = (f"candidates={self.candidate_count}, cells=2^{self.hasher.bits}, {self.strategy}"
                if self.uses_candidates else "exact")
        return (f"{self.num_codes} x {self.dim}, rows [{self.row_start}, {self.row_stop}) of "
                f"{self.world} shards, {path}, {self.semantics}")


def _bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret t's bytes as dtype. A fresh contiguous copy first: a dtype view needs
    aligned strides, which slices of byte records (and single-row slices) need not have."""
    return t.clone(memory_format=torch.contiguous_format).view(dtype)


def _anchor(device: torch.device) -> torch.Tensor:
    return torch.empty(0, device=device, requires_grad=True)


def _dtype_of(flags: list[int]) -> torch.dtype:
    return torch.float64 if any(f & _F_F64 for f in flags) else torch.float32


def _merge_rows(idx: torch.Tensor, rows: torch.Tensor, dim: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """TernaryMatrix.evidence()'s merge: one index_add_ over the entries in the given order."""
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    merged = torch.zeros(uniq.numel(), dim, dtype=rows.dtype, device=rows.device)
    merged.index_add_(0, inverse, rows)
    return uniq, merged


def _merge_int(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dim: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.cat([i for i, _, _ in entries])
    uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
    v = torch.zeros(uniq.numel(), dim, dtype=torch.int32, device=idx.device)
    e = torch.zeros(uniq.numel(), dtype=torch.int32, device=idx.device)
    v.index_add_(0, inv, torch.cat([x for _, x, _ in entries]))
    e.index_add_(0, inv, torch.cat([x for _, _, x in entries]))
    return uniq, v, e


# -- checkpoint layout -------------------------------------------------------------------------

def shard_range(state_dict: Mapping[str, Any], prefix: str = "") -> tuple[int, int, int]:
    """(row_start, row_stop, num_codes) recorded in one shard's state_dict."""
    key = prefix + "_extra_state"
    if key not in state_dict:
        raise ValueError(f"state_dict has no {key!r}: not a sharded codebook shard")
    s = state_dict[key]
    return int(s["row_start"]), int(s["row_stop"]), int(s["num_codes"])


def verify_shard_states(states: Sequence[Mapping[str, Any]], prefix: str = "") -> list[int]:
    """Check that shard state_dicts (in rank order) tile [0, num_codes) with contiguous blocks
    whose buffers have the recorded row counts; return the bounds (so that
    `shard_sizes = diff(bounds)` rebuilds the same layout). Raises ValueError naming the shard."""
    if not states:
        raise ValueError("no shard states given")
    bounds, n0, dim0 = [0], None, None
    for r, sd in enumerate(states):
        a, b, n = shard_range(sd, prefix)
        dim = int(sd[prefix + "_extra_state"]["dim"])
        n0 = n if n0 is None else n0
        dim0 = dim if dim0 is None else dim0
        if (n, dim) != (n0, dim0):
            raise ValueError(f"shard {r} belongs to a {n} x {dim} codebook, shard 0 to {n0} x {dim0}")
        if a != bounds[-1] or b <= a:
            raise ValueError(f"shard {r} holds rows [{a}, {b}); expected a non-empty block "
                             f"starting at {bounds[-1]}")
        for name in ("matrix.packed", "matrix.exponent", "matrix.t_accum", "matrix.e_accum",
                     "usage"):
            t = sd.get(prefix + name)
            if t is None or t.shape[0] != b - a:
                raise ValueError(f"shard {r}: buffer {prefix + name} has "
                                 f"{None if t is None else t.shape[0]} rows, expected {b - a}")
        bounds.append(b)
    if bounds[-1] != n0:
        raise ValueError(f"shards cover rows [0, {bounds[-1]}) of {n0}")
    return bounds
