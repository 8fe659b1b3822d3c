"""ZeRO-style partition of the ternary accumulators over the data-parallel ranks.

The unpartitioned baseline (arbd/ternary/dp.py) all-reduces the evidence and every rank then
updates every row, so every rank holds every accumulator: 1 byte per weight of int8 `t_accum`
on top of the 0.2 byte of packed trits. Here, as ZeRO does with optimizer state, each dp rank
owns one contiguous block of rows of every dense TernaryMatrix and keeps the accumulators of
those rows only. A step at the accumulation boundary:

1. exchange (a reduce-scatter by row blocks): every rank sends each other rank that rank's rows
   of its local evidence (integer votes, or float gradients in "summed" mode) and sums what it
   receives, in rank order, for its own block. `exchange="all_to_all"` does this with
   `all_to_all_single` and uneven split sizes (no padding, and the float sum is taken in rank
   order, so it is deterministic for any dp); `exchange="reduce_scatter"` uses
   `reduce_scatter_tensor` with every block padded to the largest (the collective NCCL runs
   best; its float summation order belongs to the backend);
2. each rank applies the rule to its rows only (`TernaryMatrix.apply_block_votes`);
3. the updated packed trits and int8 exponents of every block are all-gathered, so every rank
   again holds the whole decoded weight for the next forward.

Persistent bytes per rank fall from ~1.2 to ~(0.2 + 1/dp) per weight (plus 1 + 1/dp per row).

Exactness against dp = 1 accumulating the same micro-batches in rank order (ARCHITECTURE.md 6):
- mode "votes": integer sums, bit-identical for any dp and either exchange;
- mode "summed": float gradients; bit-identical when they travel in fp32 (or fp64) with
  `exchange="all_to_all"` for any dp (each rank adds the contributions in rank order, as dp = 1
  adds its micro-batches), and with `reduce_scatter` for dp = 2 (a + b = b + a). bf16 on the
  wire (the default, like dp.py) rounds the evidence and is not exact.

Row-local rule, global exceptions: quantisation normalises each row by its own mean |g|, and the
stochastic rounding hashes global row ids, so a block quantises exactly as the whole matrix
would. In "summed" mode the scale votes (scale_mode "norm") divide by the mean |dL/dE| over all
rows: ranks all-gather their rows' dL/dE (4 bytes per row) so each uses the same mean.

Not partitioned (they stay replicated and go through dp.py's reduction): matrices fed sparse
row evidence (modules with `sparse=True`, and TernaryMatrix subclasses such as the codebooks'
PlacedTernaryMatrix, which the codebook group row-shards on its own), and matrices with rows
shorter than MIN_ROW_FOR_ROW_NORM (norm gains: their quantisation normalises over the whole
tensor, and they are a negligible share of the weights).

Non-finite evidence or loss on any rank makes every rank skip the step: the flags are agreed
before the exchange, so no state changes anywhere and no rank waits on a collective the others
skip.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from arbd.ternary.dp import WireStats, max_abs, reduce_evidence_sign_votes, reduce_evidence_summed
from arbd.ternary.rule import MIN_ROW_FOR_ROW_NORM, TernaryRule, abs_mean
from arbd.ternary.state import TernaryMatrix, all_evidence_finite
from arbd.ternary.update import (apply_updates, apply_updates_counted, ternary_matrices,
                                 update_fused_grouped)

Mats = list[tuple[str, TernaryMatrix]]


def row_blocks(rows: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row blocks, one per rank; the first `rows % world` ranks hold one
    row more (a rank may hold none when rows < world)."""
    if rows < 0 or world < 1:
        raise ValueError(f"need rows >= 0 and world >= 1, got {rows}, {world}")
    base, extra = divmod(rows, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass
class ZeroWireStats:
    """Bytes this rank sends to other ranks (what a ring or pairwise implementation moves)."""
    calls: int = 0            # exchanges done (steps not skipped before the exchange)
    exchange_bytes: int = 0   # evidence, reduce-scatter by row blocks
    gather_bytes: int = 0     # packed trits + exponents, all-gather
    control_bytes: int = 0    # flags, dL/dE rows for the scale norm, counters
    weights: int = 0          # partitioned ternary weights covered per exchange

    @property
    def bytes_per_weight_per_step(self) -> float:
        """Evidence plus trit traffic per partitioned weight per step."""
        return (self.exchange_bytes + self.gather_bytes) / max(1, self.weights * self.calls)


@dataclass
class _Part:
    name: str
    matrix: TernaryMatrix
    blocks: list[tuple[int, int]]


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1  # one process: every block is the whole matrix, no collectives
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the data-parallel group")
    return rank, dist.get_world_size(group)


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    with warnings.catch_warnings():  # torch 2.13 warns on gloo (PLATFORM.md); harmless here
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, group=group)


def _is_sparse_owned(model: nn.Module) -> set[int]:
    """ids of matrices owned by modules that declare sparse row lookups."""
    out: set[int] = set()
    for mod in model.modules():
        if getattr(mod, "sparse", False) is True:
            out.update(id(m) for m in mod.modules() if isinstance(m, TernaryMatrix))
    return out


class ZeroPartitioner:
    """Partitions the accumulators of `model`'s dense TernaryMatrix rows over `group` and runs
    the ternary update of the step (see the module docstring).

    Construction takes over a replicated model (every rank holding the same full state, as after
    init or `load_state_dict`): each rank keeps its own block of accumulators and frees the
    rest, and the partitioner installs itself as `model.ternary_evidence_reducer`, so
    `apply_ternary_update`, `_ternary_update_memory` and `TernaryOptimizer.step` use it as they
    are: it reduces in `__call__` and updates in `update_matrices`.

    mode: "votes" (integer votes per micro-batch, exact) or "summed" (float gradients, quantised
    once; `dtype` on the wire). exchange: "all_to_all" or "reduce_scatter".
    partition: an optional further filter (name, matrix) -> bool on the matrices partitioned.
    """

    def __init__(self, model: nn.Module, group=None, mode: str = "votes", *,
                 exchange: str = "all_to_all", dtype: torch.dtype = torch.bfloat16,
                 encoding: str = "int8",
                 partition: Callable[[str, TernaryMatrix], bool] | None = None) -> None:
        if mode not in ("votes", "summed"):
            raise ValueError(f"mode must be 'votes' or 'summed', got {mode!r}")
        if exchange not in ("all_to_all", "reduce_scatter"):
            raise ValueError(f"exchange must be 'all_to_all' or 'reduce_scatter', got {exchange!r}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be a float dtype, got {dtype}")
        self.model, self.group, self.mode = model, group, mode
        self.exchange, self.dtype, self.encoding = exchange, dtype, encoding
        self.wants_votes = mode == "votes"  # read by apply_ternary_update / TernaryOptimizer
        self.rank, self.world = _rank_world(group)
        self.stats = ZeroWireStats()
        self.replicated_stats = WireStats()  # dp.py's counters for the replicated matrices
        sparse = _is_sparse_owned(model)
        self.parts: list[_Part] = []
        self.replicated: list[str] = []
        for name, m in ternary_matrices(model):
            ok = (type(m) is TernaryMatrix and id(m) not in sparse and m.cols >= MIN_ROW_FOR_ROW_NORM
                  and (partition is None or partition(name, m)))
            if not ok:
                self.replicated.append(name)
                continue
            if m.is_partitioned:
                raise ValueError(f"{name} is partitioned already")
            self.parts.append(_Part(name, m, row_blocks(m.rows, self.world)))
        for p in self.parts:
            p.matrix.partition_rows(*p.blocks[self.rank])
        self._by_id = {id(p.matrix): p for p in self.parts}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        model.ternary_evidence_reducer = self

    # -- bookkeeping -------------------------------------------------------------------------
    def accumulator_bytes(self) -> int:
        """Accumulator bytes this rank holds for the partitioned matrices."""
        return sum(p.matrix.t_accum.numel() + p.matrix.e_accum.numel() for p in self.parts)

    def partitioned_weights(self) -> int:
        return sum(p.matrix.rows * p.matrix.cols for p in self.parts)

    # -- phase 1: reduce (the `ternary_evidence_reducer` call) --------------------------------
    def __call__(self, mats: Mats) -> None:
        self._pending = {}
        part = [(n, m) for n, m in mats if id(m) in self._by_id]
        rest = [(n, m) for n, m in mats if id(m) not in self._by_id]
        if len(part) != len(self.parts):
            raise ValueError("the matrices handed over differ from the partitioned model's")
        if rest and self.world > 1:
            if self.mode == "votes":
                reduce_evidence_sign_votes(rest, self.group, encoding=self.encoding,
                                           stats=self.replicated_stats)
            else:
                reduce_evidence_summed(rest, self.group, dtype=self.dtype, stats=self.replicated_stats)
        # Identical on every rank after the reduction above.
        rest_bad = not all_evidence_finite([m for _, m in rest])

        local: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        n = len(part)
        info = torch.zeros(3 * n + 2, dtype=torch.int64)  # dense?, sparse-only?, bad?; max|vote|; rest bad
        for i, (name, m) in enumerate(part):
            bad = m.marked_nonfinite
            if self.mode == "votes":
                if m.evidence()[1] is not None:
                    raise ValueError(f"{name}: float evidence is pending; commit the micro-batch "
                                     "(apply_ternary_update does) before the reduction")
                idx, v, e = m.votes()
                ev = None if v is None else (v, e)
            else:
                if m.has_votes:
                    raise ValueError("summed mode needs float evidence; votes were committed already")
                idx, g = m.evidence()
                ev = None if g is None else (g, None)
            if ev is not None and idx is not None:
                # Sparse rows only here: densify. dp = 1 takes the dense path as soon as any
                # micro-batch is dense; if none is, the check below refuses the step.
                dv = ev[0].device
                v = torch.zeros(m.rows, m.cols, dtype=ev[0].dtype, device=dv).index_add_(0, idx, ev[0])
                e = None if ev[1] is None else \
                    torch.zeros(m.rows, dtype=ev[1].dtype, device=dv).index_add_(0, idx, ev[1])
                ev = (v, e)
                info[n + i] = 1
            elif ev is not None:
                info[i] = 1
            info[2 * n + i] = int(bad)
            local.append(ev)
        # One readback for all matrices (not one per matrix): the max |vote|, and in summed mode
        # whether all float evidence is finite (any non-finite matrix skips the whole step).
        if self.mode == "votes":
            info[3 * n] = max_abs([t for ev in local if ev is not None for t in ev])
        elif not all_evidence_finite([m for _, m in part]):
            info[2 * n] = 1
        info[3 * n + 1] = int(rest_bad)
        if self.world > 1:
            dist.all_reduce(info, op=dist.ReduceOp.MAX, group=self.group)
            self.stats.control_bytes += info.numel() * 8
        dense_any, sparse_any, bad_any = info[:n], info[n:2 * n], info[2 * n:3 * n]
        for i, (name, _) in enumerate(part):
            if sparse_any[i] and not dense_any[i]:
                raise ValueError(f"{name}: only sparse row evidence reached a partitioned matrix "
                                 "(dp = 1 would update the touched rows only); leave it "
                                 "unpartitioned with ZeroPartitioner(partition=...)")
        for _, m in part:
            m.clear_evidence()  # the local full-size evidence is copied into the send buffer below
        if bool(bad_any.any()) or int(info[3 * n + 1]):
            # Every rank got the same flags: all skip, none enters the exchange.
            if bool(bad_any.any()):
                for _, m in part:
                    m.mark_nonfinite()
            return
        active = [i for i in range(n) if dense_any[i] or sparse_any[i]]
        if active:
            self._exchange([part[i][1] for i in active], [local[i] for i in active], int(info[3 * n]))

    def _exchange(self, mats: list[TernaryMatrix], local: list, max_vote: int) -> None:
        w, me = self.world, self.rank
        dev = mats[0].packed.device   # the payload stays on the GPU (NCCL); flags use gloo
        votes = self.mode == "votes"
        if votes:
            bound = max_vote if self.exchange == "all_to_all" else max_vote * w
            wire_dtype = torch.int8 if bound <= 127 else torch.int32  # gloo and NCCL lack int16
            acc_dtype = torch.int32
        else:
            wire_dtype = self.dtype
            f64 = any(ev is not None and ev[0].dtype == torch.float64 for ev in local)
            wide = f64 and (self.dtype == torch.float64 or w == 1)
            acc_dtype = torch.float64 if wide else torch.float32
        if w == 1:  # nothing travels: keep the evidence as it is (no bf16 rounding)
            wire_dtype = acc_dtype

        def block(m: TernaryMatrix, ev, d: int) -> list[torch.Tensor]:
            a, b = self._by_id[id(m)].blocks[d]
            if ev is None:  # no evidence here this step, some on another rank
                z = [torch.zeros((b - a) * m.cols, dtype=wire_dtype, device=dev)]
                return z + ([torch.zeros(b - a, dtype=wire_dtype, device=dev)] if votes else [])
            out = [ev[0][a:b].reshape(-1).to(wire_dtype)]
            return out + ([ev[1][a:b].to(wire_dtype)] if votes else [])

        def rows_of(m: TernaryMatrix, d: int) -> int:
            a, b = self._by_id[id(m)].blocks[d]
            return b - a

        # votes carry each row's scale vote after its trit votes
        seg = [sum(rows_of(m, d) * (m.cols + int(votes)) for m in mats) for d in range(w)]
        sends = [torch.cat([t for m, ev in zip(mats, local) for t in block(m, ev, d)]) if seg[d] else
                 torch.zeros(0, dtype=wire_dtype, device=dev) for d in range(w)]
        el = torch.empty(0, dtype=wire_dtype).element_size()
        if w == 1:
            total = sends[0].to(acc_dtype)
        elif self.exchange == "all_to_all":
            send = torch.cat(sends)
            recv = torch.empty(w * seg[me], dtype=wire_dtype, device=dev)
            dist.all_to_all_single(recv, send, [seg[me]] * w, seg, group=self.group)
            total = recv[:seg[me]].to(acc_dtype, copy=True)
            for s in range(1, w):  # rank order: the order dp = 1 adds its micro-batches
                total += recv[s * seg[me]:(s + 1) * seg[me]].to(acc_dtype)
            self.stats.exchange_bytes += (sum(seg) - seg[me]) * el
        else:
            mx = max(seg)
            send = torch.zeros(w * mx, dtype=wire_dtype, device=dev)
            for d in range(w):
                send[d * mx:d * mx + seg[d]] = sends[d]
            out = torch.empty(mx, dtype=wire_dtype, device=dev)
            _reduce_scatter(out, send, self.group)
            total = out[:seg[me]].to(acc_dtype)
            self.stats.exchange_bytes += (w - 1) * mx * el  # a ring moves W-1 padded blocks
        off = 0
        for m in mats:
            a, b = self._by_id[id(m)].blocks[me]
            k = (b - a) * m.cols
            g = total[off:off + k].reshape(b - a, m.cols)
            off += k
            e = None
            if votes:
                e = total[off:off + b - a]
                off += b - a
            self._pending[id(m)] = (g, e)
        self.stats.calls += 1
        self.stats.weights = self.partitioned_weights()

    # -- phase 2: update own rows, all-gather packed trits --------------------------------------
    @torch.no_grad()
    def update_matrices(self, mats: Mats, rule: TernaryRule, *,
                        counted: Callable[[TernaryMatrix, bool], bool] | None = None) -> dict[str, int]:
        """Called by apply_ternary_update once the step is known to be finite everywhere.

        Returns the trit flips and scale moves of the dp group (summed over its ranks). With
        `counted(matrix, partitioned)` it returns instead this rank's counts of the matrices the
        predicate names, with no collective: a caller that spans more groups (tensor and expert
        parallelism, codebook owners) adds every rank's share in one reduction of its own."""
        # replicated matrices: the same update on every rank, counted once
        rep = [(n, m) for n, m in mats if id(m) not in self._by_id]
        s = apply_updates(rep, rule) if counted is None else \
            apply_updates_counted(rep, rule, lambda m: counted(m, False))
        flips, moves = s["trit_flips"], s["scale_moves"]
        todo = [p for p in self.parts if id(p.matrix) in self._pending]
        mean_abs, block_g_e = self._scale_norms(todo, rule) if self.mode == "summed" else ({}, {})
        local = torch.zeros(2, dtype=torch.int64)
        # Counts stay on the device where a kernel made them and are read once, at the end: a
        # readback per matrix made the 2-GPU step wait on its GPU ~170 times (bench/RESULTS.md).
        on_device: list[torch.Tensor] = []
        fused: dict[bool, list] = {True: [], False: []}   # counted or not -> (matrix, DenseItem)
        if self.mode == "summed" and rule.norm != "row" and todo:   # on every rank alike
            raise ValueError('partitioned "summed" updates need rule.norm == "row" '
                             "(a tensor-wide norm needs the whole gradient)")

        def torch_rule(m: TernaryMatrix, ev: torch.Tensor, e_votes, is_counted: bool) -> None:
            """Quantise summed evidence with the torch rule (TernaryMatrix.quantize: global row
            ids for the hash, a tensor-parallel shard's row statistics completed over its tp
            group), then the block's integer update."""
            if self.mode == "summed":
                rows = torch.arange(m.row_start, m.row_stop, device=ev.device)
                ev, e_votes = m.quantize(ev, rule, rows, mean_abs=mean_abs.get(id(m)),
                                         g_e=block_g_e.get(id(m)))
            s = m.apply_block_votes(ev, e_votes, rule, counts_on_device=True)
            if is_counted:
                if "counts" in s:
                    on_device.append(s["counts"])
                else:
                    local[0] += s["trit_flips"]
                    local[1] += s["scale_moves"]

        for p in todo:
            m = p.matrix
            ev, e_votes = self._pending.pop(id(m))
            if m.row_stop == m.row_start:
                continue   # an empty block (fewer rows than ranks): nothing to update here
            is_counted = counted is None or counted(m, True)
            if self.mode == "summed":
                if rule.learn_scales and rule.scale_mode == "norm" and id(m) not in mean_abs:
                    raise ValueError('scale_mode "norm" needs the mean |dL/dE| over all rows')
                item = m.fused_block_item(ev, mean_abs.get(id(m)), rule, block_g_e.get(id(m)))
                if item is not None:
                    fused[is_counted].append((m, item))
                    continue
            torch_rule(m, ev, e_votes, is_counted)
        for is_counted, pairs in fused.items():
            counts, failed = update_fused_grouped(pairs, rule)
            if is_counted:
                on_device.extend(counts)
            for m, item in pairs:   # the kernel did not compile for this width: the torch rule
                if m in failed:
                    torch_rule(m, item.grad, None, is_counted)
        self._pending = {}
        self._gather_packed(todo)
        if on_device:
            dev = on_device[0].device
            local = local.to(dev) + torch.stack(on_device).sum(0, dtype=torch.int64)
        if self.world > 1 and counted is None:
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
            self.stats.control_bytes += local.numel() * 8
        f, mv = local.tolist()   # the one readback of the update's counts
        return {"trit_flips": flips + f, "scale_moves": moves + mv}

    def _scale_norms(self, todo: list[_Part], rule: TernaryRule
                     ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Mean |dL/dE| over all rows of each matrix (summed mode, scale_mode "norm"), and this
        rank's block of dL/dE rows (reused by the quantisation, not computed twice)."""
        if not (rule.learn_scales and rule.scale_mode == "norm") or not todo:
            return {}, {}
        # The kernel, one launch per column count, where it can take the matrix; the torch rule
        # for the rest (tensor-parallel column shards complete their row sums over the tp group).
        items = [None if p.matrix.tp_shard is not None else
                 p.matrix.fused_block_item(self._pending[id(p.matrix)][0], None) for p in todo]
        rows: list[torch.Tensor | None] = [None] * len(todo)
        if any(it is not None for it in items):
            from arbd.ternary.triton_update import row_scale_grads
            got = iter(row_scale_grads([it for it in items if it is not None]))
            rows = [next(got) if it is not None else None for it in items]
        for i, p in enumerate(todo):
            if rows[i] is None:
                m = p.matrix
                g, _ = self._pending[id(m)]
                rows[i] = m.scale_grad(g, torch.arange(m.row_start, m.row_stop, device=g.device))
        full = self._gather_rows(todo, [r[:, None] for r in rows], rows[0].dtype)
        return ({id(p.matrix): abs_mean(f[:, 0]) for p, f in zip(todo, full)},
                {id(p.matrix): r for p, r in zip(todo, rows)})

    def _gather_rows(self, todo: list[_Part], blocks: list[torch.Tensor],
                     dtype: torch.dtype, count: str = "control") -> list[torch.Tensor]:
        """All-gather each matrix's per-rank row blocks [rows_r, k] into full [rows, k] tensors
        (blocks padded to the largest so one all_gather_into_tensor carries them all)."""
        w = self.world
        if w == 1:
            return [b.clone() for b in blocks]
        sizes = [max(b1 - b0 for b0, b1 in p.blocks) * t.shape[1] for p, t in zip(todo, blocks)]
        seg = sum(sizes)
        dev = blocks[0].device
        send = torch.zeros(seg, dtype=dtype, device=dev)
        off = 0
        for t, k in zip(blocks, sizes):
            send[off:off + t.numel()] = t.reshape(-1)
            off += k
        out = torch.empty(w * seg, dtype=dtype, device=dev)
        _all_gather_into(out, send, self.group)
        nbytes = (w - 1) * seg * send.element_size()
        if count == "control":
            self.stats.control_bytes += nbytes
        else:
            self.stats.gather_bytes += nbytes
        fulls, off = [], 0
        for p, t, k in zip(todo, blocks, sizes):
            cols = t.shape[1]
            full = torch.empty(p.matrix.rows, cols, dtype=dtype, device=dev)
            for s, (a, b) in enumerate(p.blocks):
                full[a:b] = out[s * seg + off:s * seg + off + (b - a) * cols].reshape(b - a, cols)
            fulls.append(full)
            off += k
        return fulls

    def _gather_packed(self, todo: list[_Part]) -> None:
        if self.world == 1 or not todo:
            return
        blocks = []
        for p in todo:
            m = p.matrix
            a, b = m.row_start, m.row_stop
            # one uint8 row per matrix row: packed trits, then the exponent's byte
            blocks.append(torch.cat([m.packed[a:b], m.exponent[a:b].view(torch.uint8)[:, None]], 1))
        fulls = self._gather_rows(todo, blocks, torch.uint8, count="gather")
        for p, f in zip(todo, fulls):
            nb = p.matrix.packed.shape[1]
            p.matrix.packed.copy_(f[:, :nb])
            p.matrix.exponent.copy_(f[:, nb].view(torch.int8))

    # -- checkpoints and re-partitioning --------------------------------------------------------
    @torch.no_grad()
    def gather_full_state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with every accumulator whole, on every rank: what the
        unpartitioned model would hold (checkpoints, tests, re-partitioning at another dp)."""
        sd = {k: v.clone() for k, v in self.model.state_dict().items()}
        if not self.parts:
            return sd
        blocks = [torch.cat([p.matrix.t_accum, p.matrix.e_accum[:, None]], 1) for p in self.parts]
        fulls = self._gather_rows(self.parts, blocks, torch.int8)
        for p, f in zip(self.parts, fulls):
            pre = f"{p.name}." if p.name else ""
            sd[pre + "t_accum"] = f[:, :p.matrix.cols].clone()
            sd[pre + "e_accum"] = f[:, p.matrix.cols].clone()
        return sd

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load an unpartitioned state_dict (e.g. gathered at another dp) into this partition:
        each rank keeps its own rows of every partitioned accumulator."""
        local = dict(state)
        for p in self.parts:
            pre = f"{p.name}." if p.name else ""
            m = p.matrix
            t, e = state[pre + "t_accum"], state[pre + "e_accum"]
            if tuple(t.shape) != (m.rows, m.cols) or tuple(e.shape) != (m.rows,):
                raise ValueError(f"{p.name}: expected whole accumulators {(m.rows, m.cols)}, got "
                                 f"{tuple(t.shape)}")
            local[pre + "t_accum"] = t[m.row_start:m.row_stop]
            local[pre + "e_accum"] = e[m.row_start:m.row_stop]
        self.model.load_state_dict(local, strict=strict)
        self._pending = {}

    @torch.no_grad()
    def unpartition(self) -> None:
        """Give every rank all the accumulators back and detach from the model (which then needs
        an unpartitioned reducer such as dp.DPEvidenceReducer again)."""
        full = self.gather_full_state()
        for p in self.parts:
            pre = f"{p.name}." if p.name else ""
            p.matrix.unpartition(full[pre + "t_accum"], full[pre + "e_accum"])
        self.parts, self._by_id, self._pending = [], {}, {}
        if getattr(self.model, "ternary_evidence_reducer", None) is self:
            self.model.ternary_evidence_reducer = None


def make_ternary_reducer(model: nn.Module, group=None, *, zero_stage: int, mode: str = "votes",
                         **kwargs):
    """The ternary reducer DeepSpeed's ZeRO stage asks for, installed on `model`: stage 0 keeps
    every accumulator on every rank (dp.DPEvidenceReducer, all-reduce); stage >= 1 partitions
    them (ZeroPartitioner; stages 1 and 2 both reduce-scatter the evidence, since nothing needs
    it whole once the accumulators are sharded)."""
    if zero_stage < 0:
        raise ValueError(f"zero_stage must be >= 0, got {zero_stage}")
    if zero_stage == 0:
        from arbd.ternary.dp import DPEvidenceReducer
        red = DPEvidenceReducer(group, mode=mode, **{k: v for k, v in kwargs.items()
                                                    if k in ("dtype", "encoding")})
        model.ternary_evidence_reducer = red
        return red
    return ZeroPartitioner(model, group, mode, **kwargs)
