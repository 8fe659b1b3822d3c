"""TernaryMatrix: the persistent state of one ternary weight, and its transient evidence.

Persistent (buffers, in state_dict): packed trits uint8 [rows, ceil(cols/5)], exponent int8 [rows],
t_accum int8 [rows, cols], e_accum int8 [rows]. That is 1.2 bytes per weight plus 2 bytes per row.
Transient (plain attributes, never saved): the float gradient of the decoded weight collected in
backward, dense or as (row ids, row gradients) for the sparse path. It lives from backward to the
next update and is then dropped. Optionally (`commit_micro_batch`), each micro-batch's gradient is
quantised at once into integer votes (arbd/ternary/rule.py) that are summed exactly; the update
then uses the votes. Integer sums make micro-batch accumulation, data-parallel reduction and
row sharding give bit-identical states.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from arbd.config import SCALE_K
from arbd.ternary import ops, packing
from arbd.ternary.rule import (MIN_ROW_FOR_ROW_NORM, TernaryRule, apply_votes, quantize_evidence,
                               row_sums, scale_grad, votes_from_scale_grad)

# With t = sign(w) * (|w| > 0.5 sigma), a Gaussian draw gives P(t != 0) ~= 0.617.
_NONZERO_FRACTION = 2 * (1 - 0.6914624612740131)


# Touched-row updates: "auto" = the Triton kernel for sparse rows of CUDA matrices, "torch" =
# always the torch rule, "triton" = the kernel everywhere (CPU tests under TRITON_INTERPRET=1).
ROW_UPDATE_KERNEL = "auto"
# Dense float updates: "auto" = the fused Triton update on CUDA; "torch" / "triton" as above.
DENSE_UPDATE_KERNEL = "auto"


@functools.lru_cache(maxsize=256)
def _all_rows(rows: int, device: torch.device) -> torch.Tensor:
    """int64 [rows]: every row id, for the row kernels (the same each step, so cached)."""
    return torch.arange(rows, device=device)


def _kernel_on(setting: str, state: torch.Tensor) -> bool:
    """Whether a kernel setting ("auto" / "torch" / "triton") picks the kernel for this state."""
    return setting == "triton" or (setting == "auto" and state.is_cuda)


_KERNEL_FAILED: set[tuple] = set()


def _kernel_or_none(key: tuple, launch):
    """Run a Triton update kernel; if it cannot be compiled for this shape (seen: triton 3.6's
    TritonGPUOptimizeThreadLocality pass on 16-column rows), warn once and return None so the
    caller takes the torch rule. Compilation fails before the launch, so nothing was written."""
    if key in _KERNEL_FAILED:
        return None
    try:
        return launch()
    except RuntimeError as e:
        if "PassManager" not in str(e) and "compil" not in str(e).lower():
            raise
        _KERNEL_FAILED.add(key)
        warnings.warn(f"Triton update kernel {key} failed to compile ({str(e).splitlines()[0]}); "
                      "using the torch rule for it")
        return None


def update_fused(members: list[tuple["TernaryMatrix", Any]], rule: TernaryRule) -> torch.Tensor | None:
    """Update matrices of one column count through the fused GPU kernels (each with its
    `fused_update_item()`) and drop their evidence: int32 [2] counts on the device, or None
    (nothing changed, evidence kept) when the kernels do not compile for this width."""
    from arbd.ternary.triton_update import dense_update_many
    cols = members[0][0].cols
    counts = _kernel_or_none(("dense", cols),
                             lambda: dense_update_many([item for _, item in members], rule))
    if counts is not None:
        for m, _ in members:
            m.clear_evidence()
    return counts


_STATE_BUFFERS = ("packed", "t_accum", "exponent", "e_accum")


def record_width(cols: int) -> int:
    """Bytes of one row record (row_records): trit accumulators, packed trits, exponent, scale
    accumulator, rounded up to 16 so that every record starts 16-byte aligned (80 for 64 cols)."""
    return -(-(cols + packing.packed_cols(cols) + 2) // 16) * 16


def row_records(rows: int, cols: int, device=None) -> tuple[torch.Tensor, ...]:
    """One uint8 [rows, record_width(cols)] buffer and its views (packed uint8 [rows, nb],
    t_accum int8 [rows, cols], exponent int8 [rows], e_accum int8 [rows]).

    A touched-row update reads and writes every field of a row. Kept in four arrays, a random
    row costs a 32-byte sector per array for its 13 packed bytes and each 1-byte field: 636 DRAM
    bytes per row where 426 are needed (bench/RESULTS.md, "Touched-row update, round 3"). As
    one record per row (t_accum at 0 so its 8-byte loads stay aligned, then packed, exponent,
    e_accum) the row's state lies in three sectors."""
    rec = torch.zeros(rows, record_width(cols), dtype=torch.uint8, device=device)
    return (rec, *record_views(rec, cols))


def record_offsets(cols: int) -> tuple[int, int, int, int]:
    """Byte offsets of (packed, t_accum, exponent, e_accum) in a row record (64 cols: 64, 0, 77,
    78, which csrc/rows.cu's record kernel reads)."""
    nb = packing.packed_cols(cols)
    return cols, 0, cols + nb, cols + nb + 1


def record_views(rec: torch.Tensor, cols: int) -> tuple[torch.Tensor, ...]:
    """(packed, t_accum, exponent, e_accum) views of uint8 records [rows, record_width(cols)]."""
    p, t, e, ea = record_offsets(cols)
    return (rec[:, p:p + packing.packed_cols(cols)], rec[:, t:t + cols].view(torch.int8),
            rec[:, e].view(torch.int8), rec[:, ea].view(torch.int8))


def record_of(packed: torch.Tensor, t_accum: torch.Tensor, exponent: torch.Tensor,
              e_accum: torch.Tensor) -> tuple[int, int] | None:
    """(address of row 0's record, record stride in bytes) when the four buffers are the
    record_views of one buffer of row records, else None."""
    if t_accum.dim() != 2 or packed.dim() != 2:
        return None
    rows, cols = t_accum.shape
    stride = t_accum.stride(0)
    base = t_accum.data_ptr() - record_offsets(cols)[1]
    if packed.shape[1] != packing.packed_cols(cols) or stride < cols + packed.shape[1] + 2:
        return None
    for buf, off in zip((packed, t_accum, exponent, e_accum), record_offsets(cols)):
        if buf.shape[0] != rows or buf.stride(0) != stride or buf.data_ptr() != base + off \
                or (buf.dim() == 2 and buf.shape[1] > 1 and buf.stride(1) != 1):
            return None
    return base, stride


@dataclass(frozen=True)
class TPShard:
    """Where a tensor-parallel TernaryMatrix sits in the whole matrix.

    dim 0: this rank holds rows [offset, offset + rows) of a matrix with `global_size` rows (a
    column-parallel layer: output features split). dim 1: it holds columns [offset, offset + cols)
    of `global_size` columns (a row-parallel layer: input features split); each local row is
    packed on its own, and the row's int8 scale is shared by (and identical on) every tp rank.
    `group` is the tensor-parallel process group (None in one process).
    """
    dim: int
    offset: int
    global_size: int
    group: Any = None


def _tp_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of t over the tensor-parallel group (t itself without one)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _evidence_dtype(g: torch.Tensor) -> torch.Tensor:
    # float32 evidence, except float64 runs (CPU references) keep float64. Also what the rule
    # reads: bf16 evidence (set_evidence_dtype) widens exactly.
    return g if g.dtype == torch.float64 else g.to(torch.float32)


EVIDENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def set_evidence_dtype(model: nn.Module, name: str) -> None:
    """Accumulate every ternary matrix's dense weight evidence in `name` ("fp32" or "bf16"):
    what a plan's `evidence_dtype` sets. bf16 halves the evidence held over the micro-batches of
    a step; each micro-batch's product is still summed in fp32 by cuBLAS and rounded once as it
    is added, and the rule reads the bf16 sum exactly as fp32 (docs/decisions.md)."""
    if name not in EVIDENCE_DTYPES:
        raise ValueError(f"evidence_dtype must be one of {tuple(EVIDENCE_DTYPES)}, got {name!r}")
    for mod in model.modules():
        if isinstance(mod, TernaryMatrix):
            mod.evidence_dtype = EVIDENCE_DTYPES[name]


def all_evidence_finite(mats: list[TernaryMatrix]) -> bool:
    """Whether every matrix's evidence is finite, read back with one synchronisation per
    device (a check per matrix would wait on the GPU once per matrix). float32 evidence on a GPU
    is checked by torch's multi-tensor AMP check (a few launches for all matrices instead of two
    per matrix; the step is host-bound): it multiplies in place by 1.0, which leaves every value
    as it was, and raises a flag on any inf or NaN."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    grouped: dict[torch.device, list[torch.Tensor]] = {}
    for m in mats:
        if m._votes_nonfinite:
            return False
        _, g = m.evidence()
        if g is None:
            continue
        if g.is_cuda and g.dtype == torch.float32:
            grouped.setdefault(g.device, []).append(g)
        else:
            flags.setdefault(g.device, []).append(torch.isfinite(g).all())
    for dev, gs in grouped.items():
        found = torch.zeros(1, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, torch.ones(1, device=dev))
        flags.setdefault(dev, []).append(found[0] == 0)
    return all(bool(torch.stack(fs).all()) for fs in flags.values())


class TernaryMatrix(nn.Module):
    # Micro-batches whose evidence one commit (one backward) holds. 1 but for an expert under
    # expert parallelism, which takes the tokens of every rank of its ep group in one backward:
    # its votes then carry ep micro-batches' share of the step (update.commit_micro_batch).
    micro_batches_per_commit: int = 1
    # dtype of the dense evidence summed by add_grad_product (set_evidence_dtype); float64 runs
    # keep float64, and every other path (add_grad, row evidence, reductions) sums in float32.
    evidence_dtype: torch.dtype = torch.float32

    def __init__(self, rows: int, cols: int, *, std: float | None = None,
                 init: str = "random", generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, layout: str = "arrays") -> None:
        super().__init__()
        if rows <= 0 or cols <= 0:
            raise ValueError(f"TernaryMatrix needs positive rows and cols, got {rows} x {cols}")
        if layout not in ("arrays", "record"):
            raise ValueError(f"layout must be 'arrays' or 'record', got {layout!r}")
        self.rows, self.cols = rows, cols
        self._record: torch.Tensor | None = None
        if layout == "record":
            self._set_record(torch.zeros(rows, record_width(cols), dtype=torch.uint8,
                                         device=device))
        else:
            nb = packing.packed_cols(cols)
            self.register_buffer("packed", torch.empty(rows, nb, dtype=torch.uint8, device=device))
            self.register_buffer("exponent", torch.zeros(rows, dtype=torch.int8, device=device))
            self.register_buffer("t_accum", torch.zeros(rows, cols, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("e_accum", torch.zeros(rows, dtype=torch.int8, device=device))
        self._grad: torch.Tensor | None = None
        self._decoded: tuple | None = None   # see decoded_shared
        self._row_grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._merged_rows: list | None = None   # _row_grads when it holds one merged entry
        # Rows whose accumulators this process holds (all of them unless ZeRO-partitioned,
        # arbd/ternary/zero.py); packed trits and exponents always cover every row.
        self.row_start, self.row_stop = 0, rows
        # Set by the tensor-parallel step (arbd/parallel/tensor_parallel.py); None = whole matrix.
        self.tp_shard: TPShard | None = None
        self._clear_votes()
        self.reset(init, std=std, generator=generator)

    # -- state layout --------------------------------------------------------------------------
    # "arrays": four buffers. "record": the same four buffers are views of one row record per
    # row (row_records), so that a touched-row update moves one record per row (the codebooks;
    # bench/RESULTS.md, "Touched-row update, round 4"). state_dict keys and values are the same
    # in both layouts, so checkpoints do not depend on it.
    def _set_record(self, rec: torch.Tensor) -> None:
        for name, view in zip(_STATE_BUFFERS, record_views(rec, self.cols)):
            self._buffers[name] = view
        self._record = rec

    @property
    def layout(self) -> str:
        """The state layout: "record" while the four buffers are still the views of one row
        record, else "arrays" (a buffer replaced by assignment, e.g. a tensor-parallel split,
        ends it)."""
        rec = self.__dict__.get("_record")   # absent in matrices pickled before row records
        if rec is None or self.t_accum.shape[0] != rec.shape[0] or record_of(
                self.packed, self.t_accum, self.exponent, self.e_accum) != (rec.data_ptr(),
                                                                            rec.stride(0)):
            return "arrays"
        return "record"

    @torch.no_grad()
    def to_arrays(self) -> None:
        """Give up the row records for four contiguous buffers (same values)."""
        if self.__dict__.get("_record") is None:
            return
        for name in _STATE_BUFFERS:
            self._buffers[name] = self._buffers[name].clone(memory_format=torch.contiguous_format)
        self._record = None

    def _apply(self, fn, recurse=True):
        # nn.Module._apply would map each view on its own (four separate copies after .to()):
        # map the record once and take the views again.
        if self.layout != "record":
            self._record = None
            return super()._apply(fn, recurse)
        views = {k: self._buffers.pop(k) for k in _STATE_BUFFERS}
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(views)
            raise
        self._set_record(fn(self._record))
        return self

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, init: str = "random", *, std: float | None = None,
              generator: torch.Generator | None = None) -> None:
        """init='random': trits from a thresholded Gaussian, scale so the decoded weight has
        standard deviation `std` (default 1/sqrt(cols)); init='ones': all +1 and scale 1 (norm gains)."""
        dev = self.packed.device
        if init not in ("random", "ones"):
            raise ValueError(f"init must be 'random' or 'ones', got {init!r}")
        if dev.type == "meta":  # shape-only build (e.g. counting arb-3b): nothing to fill
            return
        if init == "ones":
            trits = torch.ones(self.rows, self.cols, dtype=torch.int8, device=dev)
            self.exponent.zero_()
        elif init == "random":
            w = torch.randn(self.rows, self.cols, generator=generator, device="cpu").to(dev)
            trits = (torch.sign(w) * (w.abs() > 0.5)).to(torch.int8)
            std = 1.0 / math.sqrt(self.cols) if std is None else std
            scale = std / math.sqrt(_NONZERO_FRACTION)
            self.exponent.fill_(int(packing.scale_to_exponent(torch.tensor(scale))))
        else:
            raise ValueError(f"init must be 'random' or 'ones', got {init!r}")
        self.packed.copy_(packing.pack_trits(trits))
        self.t_accum.zero_()
        self.e_accum.zero_()
        self.clear_evidence()

    @torch.no_grad()
    def set_trits(self, trits: torch.Tensor, exponent: torch.Tensor | None = None) -> None:
        """Overwrite the trits (and optionally the exponents); shapes are checked."""
        if tuple(trits.shape) != (self.rows, self.cols):
            raise ValueError(f"trits must have shape {(self.rows, self.cols)}, got {tuple(trits.shape)}")
        if trits.abs().max() > 1:
            raise ValueError("trits must be in {-1, 0, 1}")
        self.packed.copy_(packing.pack_trits(trits.to(self.packed.device)))
        if exponent is not None:
            if tuple(exponent.shape) != (self.rows,):
                raise ValueError(f"exponent must have shape {(self.rows,)}, got {tuple(exponent.shape)}")
            self.exponent.copy_(exponent.to(torch.int8))

    # -- reading -----------------------------------------------------------------------------
    def trits(self) -> torch.Tensor:
        return packing.unpack_trits(self.packed, self.cols)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole matrix as floats: transient, for dense layers of moderate size."""
        return ops.decode(self.packed, self.exponent, self.cols, dtype)

    def decoded_shared(self, dtype: torch.dtype, decode: Callable[[], torch.Tensor],
                       keep: bool = False) -> torch.Tensor:
        """decode() in `dtype`, or the W an earlier call returned if that tensor is still alive
        (autograd holds it for a backward) and the trits and exponents have not changed since
        (same buffers, same version counters). A layer called several times in one forward (the
        ACT loop) then decodes once. `keep`: hold W until the trits change, for small matrices
        (norm gains) whose decode would otherwise cost a launch at every call."""
        key = (dtype, self.packed._version, self.exponent._version)
        cached = self._decoded
        w = cached[2]() if cached is not None and cached[0] == key and cached[1]() is self.packed else None
        if w is None:
            w = decode()
            self._decoded = (key, weakref.ref(self.packed), (lambda w=w: w) if keep else weakref.ref(w))
        return w

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decoded"] = None   # weak references do not pickle; the cache starts empty
        if self.layout == "record":
            # torch.save refuses uint8 and int8 views of one storage: pickle the record alone
            # and take the views again on load (copy.deepcopy goes through here too).
            state["_buffers"] = {k: v for k, v in self._buffers.items() if k not in _STATE_BUFFERS}
        else:
            state["_record"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_record") is not None and "packed" not in self._buffers:
            self._set_record(self._record)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "record":
            # Contiguous copies: the same entries as the array layout's, which torch.save takes
            # (it refuses differently typed views of one storage) and either layout loads.
            for name in _STATE_BUFFERS:
                destination[prefix + name] = destination[prefix + name].clone(
                    memory_format=torch.contiguous_format)

    def decode_rows(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the requested rows, decoded from their packed bytes (the sparse path)."""
        return ops.decode(self.packed[idx], self.exponent[idx], self.cols, dtype)

    def scale(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return packing.exponent_to_scale(self.exponent, dtype)

    def state_bytes(self) -> int:
        """Persistent bytes held for this matrix (packed + exponent + accumulators; with row
        records, the records' padding too)."""
        if self.layout == "record":
            return self._record.numel() + sum(b.numel() * b.element_size() for n, b in
                                              self.named_buffers() if n not in _STATE_BUFFERS)
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # -- evidence ----------------------------------------------------------------------------
    def add_grad(self, grad: torch.Tensor) -> None:
        """Accumulate dL/dW [rows, cols] (dense path); summed over micro-batches until update."""
        if tuple(grad.shape) != (self.rows, self.cols):
            raise ValueError(f"gradient must have shape {(self.rows, self.cols)}, got {tuple(grad.shape)}")
        g = _evidence_dtype(grad.detach())
        self._grad = g.clone() if self._grad is None else self._grad.add_(g)

    def add_grad_product(self, gy: torch.Tensor, x: torch.Tensor, backend: str = "torch",
                         bucket: bool = True) -> None:
        """Accumulate dL/dW = gy^T x (gy [..., rows], x [..., cols]) without forming it apart
        where cuBLAS can add into the evidence in place (ops.weight_grad_into, which says what
        `bucket` does)."""
        shape = (gy.shape[-1], x.shape[-1])
        if shape != (self.rows, self.cols):
            raise ValueError(f"gradient must have shape {(self.rows, self.cols)}, got {shape}")
        self._grad = ops.weight_grad_into(self._grad, gy.detach(), x.detach(), backend,
                                          dtype=self.evidence_dtype, bucket=bucket)

    def add_row_grad(self, idx: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Accumulate dL/dW for the listed rows only (sparse path). Duplicates are summed later."""
        if grad_rows.shape != (idx.numel(), self.cols):
            raise ValueError(
                f"row gradient must have shape {(idx.numel(), self.cols)}, got {tuple(grad_rows.shape)}")
        self._row_grads.append((idx.detach().reshape(-1).long(), _evidence_dtype(grad_rows.detach())))
        self.__dict__["_merged_rows"] = None

    @property
    def has_evidence(self) -> bool:
        return self._grad is not None or bool(self._row_grads) or self.has_votes

    def evidence(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(row ids or None for all rows, gradient rows). Sparse evidence is merged per row."""
        if self._grad is not None:
            g = self._grad
            for idx, rows in self._row_grads:
                g = g.index_add(0, idx, rows)
            return None, g
        if not self._row_grads:
            return None, None
        if self._row_grads is self._merged_rows:   # merged by an earlier call, nothing added since
            return self._row_grads[0]
        idx = torch.cat([i for i, _ in self._row_grads])
        rows = torch.cat([r for _, r in self._row_grads])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        merged = torch.zeros(uniq.numel(), self.cols, dtype=rows.dtype, device=rows.device)
        merged.index_add_(0, inverse, rows)
        # Keep the merged rows as the evidence: the update asks for it more than once per step
        # (finiteness check, fused item), and each merge is a unique (a host readback) and an add.
        self.__dict__.update(_row_grads=[(uniq, merged)])
        self.__dict__["_merged_rows"] = self._row_grads
        return uniq, merged

    def set_evidence(self, idx: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Replace the collected evidence (used after a data-parallel reduction)."""
        self.clear_evidence()
        if idx is None:
            self.add_grad(grad)
        else:
            self.add_row_grad(idx, grad)

    def evidence_is_finite(self) -> bool:
        return all_evidence_finite([self])

    def clear_evidence(self) -> None:
        # Plain attributes, written straight into __dict__: nn.Module.__setattr__ costs a few us
        # per call and every update clears every matrix (the update is host-bound).
        self.__dict__.update(_grad=None, _row_grads=[])
        self._clear_votes()

    # -- integer votes (per micro-batch quantised evidence) --------------------------------------
    def _clear_votes(self) -> None:
        # _votes int32 [rows, cols] (dense path), _e_votes int32 [rows], _row_votes [(idx, votes,
        # e_votes)], _row_votes_merged: _row_votes is one entry whose ids are already distinct
        # (set_votes(distinct=True)), _votes_nonfinite: evidence already known to be unusable.
        self.__dict__.update(_votes=None, _e_votes=None, _row_votes=[], _row_votes_merged=False,
                             _votes_nonfinite=False)

    @property
    def marked_nonfinite(self) -> bool:
        """True once this step's evidence has been flagged unusable (mark_nonfinite or a
        non-finite micro-batch committed as votes)."""
        return self._votes_nonfinite

    def mark_nonfinite(self) -> None:
        """Flag this step's evidence as unusable (a non-finite loss somewhere): the update skips."""
        self._votes_nonfinite = True

    @property
    def has_votes(self) -> bool:
        return self._votes is not None or bool(self._row_votes)

    @torch.no_grad()
    def commit_micro_batch(self, rule: TernaryRule) -> None:
        """Quantise the float evidence collected so far into integer votes and add them to the
        votes of this step; the float evidence is dropped. `rule` carries this micro-batch's
        rate (the step's rate divided by the micro-batches per step)."""
        idx, g = self.evidence()
        if g is None:
            self._grad, self._row_grads = None, []
            return
        if not bool(torch.isfinite(g).all()):
            self._votes_nonfinite = True
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        q, ev = self.quantize(g, rule, idx)
        self.add_committed(idx, q, ev)

    def commit_item(self):
        """This micro-batch's float evidence as a triton_update.DenseItem for `votes_many`, the
        GPU version of commit_micro_batch (update.commit_micro_batch groups them), or None where
        the torch path must commit it: a tensor-parallel shard, no evidence, evidence the kernel
        cannot read (float64), or a column count whose kernel failed to compile."""
        if not _kernel_on(DENSE_UPDATE_KERNEL, self.packed) or self.tp_shard is not None \
                or ("votes", self.cols) in _KERNEL_FAILED:
            return None
        from arbd.ternary.triton_update import DenseItem, supports
        idx, g = self.evidence()
        if g is None or not supports(self.packed, g):
            return None
        return DenseItem(self.packed, self.t_accum, self.exponent, self.e_accum, g.contiguous(),
                         None if idx is None else idx.contiguous())

    def add_committed(self, idx: torch.Tensor | None, q: torch.Tensor, ev: torch.Tensor) -> None:
        """Add one micro-batch's int32 votes (all rows, or the distinct rows idx) to the step's
        and drop the float evidence they came from."""
        self._grad, self._row_grads = None, []
        if idx is None:
            self._votes = q if self._votes is None else self._votes.add_(q)
            self._e_votes = ev if self._e_votes is None else self._e_votes.add_(ev)
        else:
            self._row_votes.append((idx, q, ev))
            self._row_votes_merged = False

    @torch.no_grad()
    def _trits_and_exponents(self, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if idx is None:
            return self.trits(), self.exponent
        return packing.unpack_trits(self.packed[idx], self.cols), self.exponent[idx]

    def scale_grad(self, g: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """dL/dE of all rows or rows idx from their evidence g; a column shard adds the other
        tp ranks' partial row sums (collective over the tp group)."""
        trits, exps = self._trits_and_exponents(idx)
        sh = self.tp_shard
        reduce = (lambda t: _tp_sum(t, sh.group)) if sh is not None and sh.dim == 1 else None
        return scale_grad(_evidence_dtype(g), trits, exps, reduce_rows=reduce)

    def quantize(self, g: torch.Tensor, rule: TernaryRule, idx: torch.Tensor | None = None, *,
                 mean_abs: torch.Tensor | None = None,
                 g_e: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 (votes [n, cols], scale votes [n]) of float evidence g for all rows or rows idx.

        A tensor-parallel shard votes as its part of the whole matrix would: row ids and column
        positions are global for the hash, and what the rule takes over a whole row (a row split
        by columns: mean |g| and dL/dE) or over all rows (a matrix split by rows: the "norm"
        scale mean) is summed over the tp group first. Collective over that group.
        `mean_abs`: the "norm" scale mean over all rows of this (local) matrix when g holds only
        some of them (a ZeRO row block); by default the mean over the rows given. `g_e`: these
        rows' dL/dE when the caller has it already (`scale_grad`, same arithmetic)."""
        g = _evidence_dtype(g)   # bf16 evidence widens exactly
        trits, exps = self._trits_and_exponents(idx)
        sh = self.tp_shard
        if sh is None:
            g_e = scale_grad(g, trits, exps) if g_e is None else g_e
            return (quantize_evidence(g, rule, row_ids=idx).to(torch.int32),
                    votes_from_scale_grad(g_e, rule, idx, mean_abs).to(torch.int32))
        local = torch.arange(self.rows, device=g.device) if idx is None else idx
        if sh.dim == 0:
            if rule.norm != "row" or self.cols < MIN_ROW_FOR_ROW_NORM:
                raise ValueError(f"a row-split TernaryMatrix ({self.rows}x{self.cols}) needs "
                                 "per-row evidence normalisation and rows of at least "
                                 f"{MIN_ROW_FOR_ROW_NORM} columns")
            gids = local + sh.offset
            q = quantize_evidence(g, rule, row_ids=gids)
            g_e = scale_grad(g, trits, exps) if g_e is None else g_e
            if rule.learn_scales and rule.scale_mode == "norm":
                # The whole matrix's mean: this shard's row sum (all its rows) over the tp group.
                local_sum = (g_e.abs().sum(dtype=torch.float64) if mean_abs is None
                             else mean_abs.double() * self.rows)
                mean_abs = (_tp_sum(local_sum.reshape(1), sh.group) / sh.global_size)[0].to(g_e.dtype)
            ev = votes_from_scale_grad(g_e, rule, gids, mean_abs)
            return q.to(torch.int32), ev.to(torch.int32)
        # dim 1: this rank holds columns [offset, offset + cols) of every row.
        gf = g if g.dtype == torch.float64 else g.to(torch.float32)
        if rule.norm == "row" and sh.global_size >= MIN_ROW_FOR_ROW_NORM:
            norm = (_tp_sum(row_sums(gf.abs()), sh.group) / sh.global_size).to(gf.dtype)
        else:
            total = gf.abs().sum(dtype=torch.float64).reshape(1, 1)
            norm = (_tp_sum(total, sh.group) / (self.rows * sh.global_size)).to(gf.dtype)
        q = quantize_evidence(gf, rule, row_ids=idx, norm=norm, col_offset=sh.offset,
                              row_len=sh.global_size)
        # dL/dE sums over the whole row: add the column blocks' partial sums.
        if g_e is None:
            g_e = scale_grad(gf, trits, exps, reduce_rows=lambda t: _tp_sum(t, sh.group))
        ev = votes_from_scale_grad(g_e, rule, idx, mean_abs)
        return q.to(torch.int32), ev.to(torch.int32)

    def votes(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(row ids or None for all rows, int32 votes [n, cols], int32 scale votes [n])."""
        if self._votes is not None:
            v, e = self._votes, self._e_votes
            for idx, rv, re in self._row_votes:
                v, e = v.index_add(0, idx, rv), e.index_add(0, idx, re)
            return None, v, e
        if not self._row_votes:
            return None, None, None
        if getattr(self, "_row_votes_merged", False) and len(self._row_votes) == 1:
            return self._row_votes[0]
        idx = torch.cat([i for i, _, _ in self._row_votes])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        v = torch.zeros(uniq.numel(), self.cols, dtype=torch.int32, device=idx.device)
        e = torch.zeros(uniq.numel(), dtype=torch.int32, device=idx.device)
        v.index_add_(0, inverse, torch.cat([rv for _, rv, _ in self._row_votes]))
        e.index_add_(0, inverse, torch.cat([re for _, _, re in self._row_votes]))
        return uniq, v, e

    def set_votes(self, idx: torch.Tensor | None, votes: torch.Tensor, e_votes: torch.Tensor,
                  nonfinite: bool = False, distinct: bool = False) -> None:
        """Replace the step's votes (used after a data-parallel reduction). distinct: the row ids
        idx are already distinct (torch.unique's output, as the reduction makes them), so votes()
        hands them over as they are instead of merging duplicates again (a sort of the ids and a
        scatter of every vote; bench/gpu_update.py times both). Ids that repeat with
        distinct=True make the update wrong: the touched-row kernels need distinct rows."""
        self._clear_votes()
        self._votes_nonfinite = bool(nonfinite)
        if idx is None:
            self._votes, self._e_votes = votes.to(torch.int32), e_votes.to(torch.int32)
        else:
            self._row_votes = [(idx.reshape(-1).long(), votes.to(torch.int32), e_votes.to(torch.int32))]
            self._row_votes_merged = bool(distinct)

    # -- update ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_update(self, rule: TernaryRule, *, counts_on_device: bool = False) -> dict:
        """Apply the accumulator rule to the rows that have evidence, then drop the evidence.

        Dense evidence updates every row; sparse evidence reads and writes only touched rows.
        Returns trit_flips / scale_moves as ints; with counts_on_device, a GPU kernel's counts
        may instead come back as "counts" (int32 [2] on the device), so that a loop over many
        matrices does not wait for each one (update.apply_updates reads them all at once).
        """
        if self.is_partitioned:
            raise RuntimeError("this TernaryMatrix holds only the accumulators of rows "
                               f"[{self.row_start}, {self.row_stop}): update it through its "
                               "ZeroPartitioner (arbd/ternary/zero.py)")
        if self.has_votes:
            if self._grad is not None or self._row_grads:
                self.commit_micro_batch(rule)
            return self._apply_votes(rule)
        fused = self.fused_update_item()
        if fused is not None:
            counts = update_fused([(self, fused)], rule)
            if counts is not None:
                if counts_on_device:
                    return {"counts": counts, "rows": self.rows}
                flips, moves = counts.tolist()
                return {"trit_flips": int(flips), "scale_moves": int(moves), "rows": self.rows}
        idx, grad = self.evidence()
        self.clear_evidence()
        if grad is None:
            return {"trit_flips": 0, "scale_moves": 0, "rows": 0}
        q, ev = self.quantize(grad, rule, idx)
        return self.apply_row_votes(idx, q, ev, rule)

    def fused_tp_item(self, rule: TernaryRule):
        """fused_update_item for a whole tensor-parallel shard (not ZeRO-partitioned) with dense
        evidence: its one block, every row, through fused_block_item, with the shard's dL/dE
        where the rule needs it. Collective over the tp group; None where the kernel cannot
        take it."""
        sh, g = self.tp_shard, self._grad
        if sh is None or not _kernel_on(DENSE_UPDATE_KERNEL, self.packed) or self.has_votes \
                or self._votes_nonfinite or self.is_partitioned or g is None or self._row_grads:
            return None
        # A column shard's scale votes need its rows' dL/dE (completed over the tp group); a row
        # shard's need them only for the "norm" mean.
        need = rule.learn_scales and (sh.dim == 1 or rule.scale_mode == "norm")
        return self.fused_block_item(g, None, rule, self.scale_grad(g) if need else None)

    def fused_update_item(self):
        """This matrix's state and float evidence as a triton_update.DenseItem when the fused
        GPU update can take it (an unsharded matrix with dense evidence, or sparse row evidence
        only, which then updates the touched rows; no votes), else None. update.apply_updates
        batches these by column count."""
        use = _kernel_on(DENSE_UPDATE_KERNEL, self.packed)
        if not use or self.has_votes or self._votes_nonfinite or self.tp_shard is not None \
                or self.is_partitioned or ("dense", self.cols) in _KERNEL_FAILED:
            return None
        from arbd.ternary.triton_update import DenseItem, supports
        g = self._grad
        if g is not None and not self._row_grads:
            if not supports(self.packed, g):
                return None
            return DenseItem(self.packed, self.t_accum, self.exponent, self.e_accum, g.contiguous())
        if g is None and self._row_grads and all(r.dtype == torch.float32 for _, r in self._row_grads):
            idx, rows = self.evidence()   # distinct sorted rows, duplicates summed
            if idx.numel() == 0:
                return None
            return DenseItem(self.packed, self.t_accum, self.exponent, self.e_accum,
                             rows.contiguous(), idx.contiguous())
        return None

    @torch.no_grad()
    def apply_row_votes(self, idx: torch.Tensor | None, votes: torch.Tensor,
                        e_votes: torch.Tensor | None, rule: TernaryRule) -> dict[str, int]:
        """The integer half of the rule on all rows (idx None) or the distinct rows idx. Touched
        rows of an unpartitioned matrix on the GPU go through one Triton launch that reads and
        writes only those rows (bit-identical to the torch rule, tests/test_triton_update.py)."""
        use = _kernel_on(ROW_UPDATE_KERNEL, self.packed)
        if use and not self.is_partitioned:
            from arbd.ternary.triton_update import apply_votes_rows
            # Whole-matrix votes (votes mode) take the same kernel over every row, instead of
            # unpacking, updating and repacking the whole matrix in torch ops.
            rows = _all_rows(self.rows, self.packed.device) if idx is None else idx
            counts = _kernel_or_none(("rows", self.cols), lambda: apply_votes_rows(
                self.packed, self.t_accum, self.exponent, self.e_accum, rows, votes, e_votes, rule))
            if counts is not None:
                flips, moves = counts.tolist()
                return {"trit_flips": int(flips), "scale_moves": int(moves),
                        "rows": int(rows.numel())}
        return self._rewrite_rows(idx, lambda *st: apply_votes(*st, votes, e_votes, rule))

    def _rewrite_rows(self, idx: torch.Tensor | None, step) -> dict[str, int]:
        """Read (trits, t_accum, exponent, e_accum) of all rows or of rows `idx`, let `step` map
        them to new values plus stats, and write them back: one read-modify-write for every rule."""
        if idx is None:
            trits, t_acc, exp, e_acc, stats = step(self.trits(), self.t_accum, self.exponent,
                                                   self.e_accum)
            self.packed.copy_(packing.pack_trits(trits))
            self.t_accum.copy_(t_acc)
            self.exponent.copy_(exp)
            self.e_accum.copy_(e_acc)
            stats["rows"] = self.rows
            return stats
        trits, t_acc, exp, e_acc, stats = step(packing.unpack_trits(self.packed[idx], self.cols),
                                               self.t_accum[idx], self.exponent[idx],
                                               self.e_accum[idx])
        self.packed[idx] = packing.pack_trits(trits)
        self.t_accum[idx] = t_acc
        self.exponent[idx] = exp
        self.e_accum[idx] = e_acc
        stats["rows"] = int(idx.numel())
        return stats

    @torch.no_grad()
    def _apply_votes(self, rule: TernaryRule) -> dict[str, int]:
        idx, v, e = self.votes()
        self.clear_evidence()
        return self.apply_row_votes(idx, v, e, rule)

    # -- row partition of the accumulators (ZeRO, arbd/ternary/zero.py) ------------------------
    @property
    def is_partitioned(self) -> bool:
        return (self.row_start, self.row_stop) != (0, self.rows)

    @torch.no_grad()
    def partition_rows(self, start: int, stop: int) -> None:
        """Keep the accumulators of rows [start, stop) only and free the rest (state_bytes drops
        accordingly). The packed trits and exponents stay whole: every rank decodes the full
        weight for its forward. The matrix must not be partitioned already."""
        if self.is_partitioned:
            raise RuntimeError(f"already partitioned to rows [{self.row_start}, {self.row_stop})")
        if not 0 <= start <= stop <= self.rows:
            raise ValueError(f"row block [{start}, {stop}) is outside [0, {self.rows})")
        self.to_arrays()   # a record holds every row's accumulators: nothing could be freed
        # clone: a view would keep the whole storage alive and free nothing
        self.t_accum = self.t_accum[start:stop].clone()
        self.e_accum = self.e_accum[start:stop].clone()
        self.row_start, self.row_stop = start, stop

    @torch.no_grad()
    def unpartition(self, t_accum: torch.Tensor, e_accum: torch.Tensor) -> None:
        """Take back the accumulators of every row (gathered from all ranks)."""
        if tuple(t_accum.shape) != (self.rows, self.cols) or tuple(e_accum.shape) != (self.rows,):
            raise ValueError(f"full accumulators must be {(self.rows, self.cols)} and {(self.rows,)}, "
                             f"got {tuple(t_accum.shape)} and {tuple(e_accum.shape)}")
        self.t_accum = t_accum.to(torch.int8, copy=True).to(self.packed.device)
        self.e_accum = e_accum.to(torch.int8, copy=True).to(self.packed.device)
        self.row_start, self.row_stop = 0, self.rows

    def fused_block_item(self, grad: torch.Tensor, mean_ge: torch.Tensor | None,
                         rule: TernaryRule | None = None, g_e: torch.Tensor | None = None):
        """The fused GPU update's DenseItem for this process's row block [row_start, row_stop)
        and the step's summed float evidence of those rows, or None where the kernel cannot take
        it (then quantize + apply_block_votes). `mean_ge`: the mean |dL/dE| over all rows of
        this (local) matrix (scale_mode "norm"), which the block alone cannot compute.

        A tensor-parallel shard (given `rule`, and its rows' dL/dE `g_e`, completed over the tp
        group for a column shard) gets what TernaryMatrix.quantize would do with it: a row shard
        hashes at its global rows and takes the "norm" mean over the whole matrix, from
        `mean_ge` or else from `g_e`, summed over the tp group; a column shard hashes in the
        whole row and divides by the whole row's norm (row sums completed over the tp group).
        Collective over the tp group, like quantize. Other tp layouts (tensor-wide norms, short
        rows) return None."""
        use = _kernel_on(DENSE_UPDATE_KERNEL, self.packed)
        if not use or ("dense", self.cols) in _KERNEL_FAILED:
            return None
        from arbd.ternary.triton_update import DenseItem, supports
        if not supports(self.packed, grad):
            return None
        a, b = self.row_start, self.row_stop
        if tuple(grad.shape) != (b - a, self.cols):
            raise ValueError(f"block evidence must have shape {(b - a, self.cols)}, got {tuple(grad.shape)}")
        if mean_ge is not None:
            mean_ge = mean_ge.to(torch.float32).reshape(1)
        views = (self.packed[a:b], self.t_accum, self.exponent[a:b], self.e_accum, grad.contiguous())
        sh = self.tp_shard
        if sh is None:
            return DenseItem(*views, row_offset=a, mean_ge=mean_ge)
        if rule is None or rule.norm != "row" or self.cols < MIN_ROW_FOR_ROW_NORM:
            return None
        if sh.dim == 0:
            if rule.learn_scales and rule.scale_mode == "norm":
                if mean_ge is None and g_e is None:
                    return None   # the whole matrix's mean needs the shard's rows
                # quantize's arithmetic: this shard's sum, over the tp group
                local = (g_e.abs().sum(dtype=torch.float64) if mean_ge is None
                         else mean_ge.double() * self.rows)
                mean_ge = (_tp_sum(local.reshape(1), sh.group) / sh.global_size).to(torch.float32)
            return DenseItem(*views, row_offset=sh.offset + a, mean_ge=mean_ge)
        if g_e is None and rule.learn_scales:
            return None
        abs_sums = _tp_sum(row_sums(_evidence_dtype(grad).abs()), sh.group)[:, 0]
        return DenseItem(*views, row_offset=a, mean_ge=mean_ge, col_offset=sh.offset,
                         row_len=sh.global_size, row_abs_sums=abs_sums,
                         ge=None if g_e is None else g_e.to(torch.float32).contiguous())

    @torch.no_grad()
    def apply_block_votes(self, votes: torch.Tensor, e_votes: torch.Tensor | None,
                          rule: TernaryRule, *, counts_on_device: bool = False) -> dict:
        """The integer half of the rule on this process's rows [row_start, row_stop) only, given
        the step's exact vote sums for those rows. Writes their packed trits, exponents and
        accumulators; the other rows' packed bytes are left for the all-gather. On the GPU the
        block goes through the touched-row kernel (bit-identical to the torch rule); with
        counts_on_device its counts may come back as "counts" (int32 [2] on the device), as in
        apply_update, so that a loop over matrices does not wait for each one."""
        a, b = self.row_start, self.row_stop
        if tuple(votes.shape) != (b - a, self.cols):
            raise ValueError(f"block votes must have shape {(b - a, self.cols)}, got {tuple(votes.shape)}")
        if b == a:
            return {"trit_flips": 0, "scale_moves": 0, "rows": 0}
        use = _kernel_on(ROW_UPDATE_KERNEL, self.packed)
        if use:
            from arbd.ternary.triton_update import apply_votes_rows
            idx = torch.arange(b - a, device=self.packed.device)
            counts = _kernel_or_none(("rows", self.cols), lambda: apply_votes_rows(
                self.packed[a:b], self.t_accum, self.exponent[a:b], self.e_accum, idx, votes,
                e_votes, rule))
            if counts is not None:
                if counts_on_device:
                    return {"counts": counts, "rows": b - a}
                flips, moves = counts.tolist()
                return {"trit_flips": int(flips), "scale_moves": int(moves), "rows": b - a}
        trits, t_acc, exp, e_acc, stats = apply_votes(
            packing.unpack_trits(self.packed[a:b], self.cols), self.t_accum, self.exponent[a:b],
            self.e_accum, votes, e_votes, rule)
        self.packed[a:b] = packing.pack_trits(trits)
        self.exponent[a:b] = exp
        self.t_accum.copy_(t_acc)
        self.e_accum.copy_(e_acc)
        stats["rows"] = b - a
        return stats

    def extra_repr(self) -> str:
        part = f", rows [{self.row_start}, {self.row_stop}) held" if self.is_partitioned else ""
        return f"{self.rows}x{self.cols}, scale_k={SCALE_K}{part}"
