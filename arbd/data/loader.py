"""Training and validation batches over a memory-mapped byte file.

Training samples are windows of seq_len + 1 bytes: inputs are the first seq_len, targets the
last seq_len (the same window shifted by one). A sample's content is a pure function of
(seed, global sample index): its start offset is splitmix64(key(seed) + (index + 1) * GAMMA)
mod (N - seq_len), N the data length, i.e. uniform over every valid start. No sampler state,
no shuffle buffer: any rank can compute any sample, and resuming only needs a position.

Sample-index layout. With data-parallel size dp, micro-batch b and gradient accumulation g,
one optimizer step consumes global_batch = dp * b * g samples, the indices
[step * global_batch, (step + 1) * global_batch). Rank r at micro-step m takes

    step * global_batch + m * (dp * b) + r * b + [0, b)

So each micro-step is a contiguous block of dp * b indices cut into one b-slice per rank, and
any (dp, g) with the same dp * g and b sees the same samples per step: dp=2, g=1 gives rank 0
indices [0, b) and rank 1 [b, 2b), exactly dp=1, g=2's first and second micro-steps. Hence a
run can change dp (compensating with g) at a step boundary without changing its data.

Validation walks the file in fixed windows that share one boundary byte: window k covers bytes
[k * seq_len, k * seq_len + seq_len + 1), so every byte after the first is a target exactly once
(the tail shorter than seq_len is not scored).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Union

import numpy as np
import torch

from arbd.data.corpus import Split

ByteData = Union[Split, str, os.PathLike, np.ndarray, bytes]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _mix64(z: np.ndarray) -> np.ndarray:
    # Same finaliser on uint64 arrays; numpy wraps array arithmetic mod 2**64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def sample_offsets(indices: np.ndarray | list[int], seed: int, num_starts: int) -> np.ndarray:
    """Start offsets (int64, in [0, num_starts)) of the samples with these global indices."""
    if num_starts <= 0:
        raise ValueError(f"num_starts must be positive, got {num_starts}")
    idx = np.asarray(indices, dtype=np.uint64)
    key = np.uint64(_mix64_int(seed))  # mixed so that nearby seeds give unrelated streams
    with np.errstate(over="ignore"):
        h = _mix64(key + (idx + np.uint64(1)) * np.uint64(_GAMMA))
    # Modulo bias is < num_starts / 2**64: negligible for any real file.
    return (h % np.uint64(num_starts)).astype(np.int64)


def as_byte_array(data: ByteData) -> np.ndarray:
    """A 1-D uint8 view of `data`: a Split, a path (memory-mapped), bytes or a uint8 array."""
    if isinstance(data, Split):
        return data.array()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"byte array must be 1-D uint8, got {data.ndim}-D {data.dtype}")
        return data
    path = os.fspath(data)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"byte file {path!r} does not exist (expected a raw byte file, "
                                f"e.g. train.bin from arbd.data.load_corpus)")
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    # One contiguous slice per window reads only the pages it needs from the memory map.
    win = np.stack([np.asarray(data[s:s + seq_len + 1]) for s in starts.tolist()])
    t = torch.from_numpy(win.astype(np.int64))
    # contiguous so callers can .view(-1) targets for cross-entropy
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class SampleCursor:
    """Position bookkeeping shared by every training loader: which global sample indices this
    rank reads at (step, micro_step), endless iteration, and resumable state.

    Subclasses provide `batch(step, micro_step)`. Each next() returns micro-step `micro_step` of
    optimizer step `step` (see the module docstring for which samples that is) and advances;
    after grad_accum micro-steps the step advances. state_dict() after k next() calls holds
    position k, so a fresh loader given it continues with exactly the batch the old one would
    have produced.
    """

    def __init__(self, micro_batch: int, *, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0) -> None:
        for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum),
                            ("dp_size", dp_size)):
            _positive(name, value)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) \
                or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed <= _MASK64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.micro_batch, self.grad_accum = int(micro_batch), int(grad_accum)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.step = 0
        self.micro_step = 0

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: dp_size * micro_batch * grad_accum."""
        return self.dp_size * self.micro_batch * self.grad_accum

    def sample_indices(self, step: int, micro_step: int) -> np.ndarray:
        """Global sample indices this rank uses at (step, micro_step)."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, grad_accum={self.grad_accum}), "
                             f"got {micro_step}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = (step * self.global_batch + micro_step * self.dp_size * self.micro_batch
                 + self.dp_rank * self.micro_batch)
        return np.arange(first, first + self.micro_batch, dtype=np.int64)

    def batch(self, step: int, micro_step: int):
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        out = self.batch(self.step, self.micro_step)
        # Advance before returning, so state_dict() taken after a batch points past it.
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.step, self.micro_step = self.step + 1, 0
        return out

    def _position_state(self) -> dict[str, Any]:
        return {"step": self.step, "micro_step": self.micro_step, "seed": self.seed,
                "global_batch": self.global_batch, "micro_batch": self.micro_batch,
                "dp_size": self.dp_size, "grad_accum": self.grad_accum}

    def _load_position(self, state: dict[str, Any], need: list[str]) -> None:
        """Check the `need` keys (plus the split, for a mid-step position) and move there.

        A position at a step boundary may be loaded with another (dp_size, grad_accum) split of
        the same global batch; mid-step positions need the same micro_batch/dp_size/grad_accum.
        """
        if state.get("micro_step", 0):
            need = need + ["micro_batch", "dp_size", "grad_accum"]
        mine = self.state_dict()
        for key in need:
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume: saved {key}={state.get(key)!r}, "
                                 f"this loader has {key}={mine[key]!r}")
        step, micro = int(state["step"]), int(state["micro_step"])
        if step < 0 or not 0 <= micro < self.grad_accum:
            raise ValueError(f"bad saved position step={step}, micro_step={micro} "
                             f"(grad_accum={self.grad_accum})")
        self.step, self.micro_step = step, micro


class ByteBatches(SampleCursor):
    """Endless iterator of (inputs, targets) int64 tensors [micro_batch, seq_len] for one rank."""

    def __init__(self, data: ByteData, seq_len: int, micro_batch: int, *, grad_accum: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        _positive("seq_len", seq_len)
        super().__init__(micro_batch, grad_accum=grad_accum, dp_rank=dp_rank, dp_size=dp_size,
                         seed=seed)
        self.data = as_byte_array(data)
        n = len(self.data)
        if n < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} "
                             f"bytes of data, got {n}")
        self.seq_len = int(seq_len)
        self.num_starts = n - self.seq_len  # valid window starts: 0 .. n - seq_len - 1

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) of (step, micro_step), without moving the position."""
        starts = sample_offsets(self.sample_indices(step, micro_step), self.seed,
                                self.num_starts)
        return _windows(self.data, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {**self._position_state(), "seq_len": self.seq_len, "data_bytes": len(self.data)}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from a saved position. Seed, seq_len and global_batch must match (else the
        same step would mean other data). strict=False skips the check that the data length is
        unchanged (e.g. a corpus rebuilt under another Python version: same positions, other bytes).
        """
        self._load_position(state, ["seed", "seq_len", "global_batch"] + (["data_bytes"] if strict else []))


class ValWindows:
    """Deterministic held-out batches: fixed windows over the whole file, no randomness.

    Window k covers bytes [k * seq_len, k * seq_len + seq_len + 1). Windows are dealt to ranks
    round-robin (rank r gets k = r, r + dp_size, ...), and the window count is rounded down to
    a multiple of dp_size so every rank runs the same number of forward passes (collectives in
    sharded forwards would otherwise hang). Sum the per-target losses over all ranks and divide
    by total_targets for bits/byte. max_windows caps the cost (the first windows of the file).
    """

    def __init__(self, data: ByteData, seq_len: int, batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, max_windows: int | None = None):
        _positive("seq_len", seq_len)
        _positive("batch_size", batch_size)
        _positive("dp_size", dp_size)
        if max_windows is not None:
            _positive("max_windows", max_windows)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) \
                or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank!r}")
        self.data = as_byte_array(data)
        n = len(self.data)
        windows = (n - 1) // seq_len if n > 0 else 0
        if max_windows is not None:
            if max_windows < dp_size:
                raise ValueError(f"max_windows={max_windows} (--val-windows) leaves no validation "
                                 f"window for some of the {dp_size} dp ranks: use at least {dp_size}")
            windows = min(windows, max_windows)
        windows -= windows % dp_size
        if windows == 0:
            raise ValueError(f"validation needs at least dp_size * seq_len + 1 = "
                             f"{dp_size * seq_len + 1} bytes for seq_len={seq_len}, "
                             f"dp_size={dp_size}; got {n}")
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.num_windows = windows  # over all ranks

    @property
    def total_targets(self) -> int:
        """Bytes scored over all ranks together."""
        return self.num_windows * self.seq_len

    @property
    def rank_windows(self) -> int:
        return self.num_windows // self.dp_size

    def __len__(self) -> int:
        return -(-self.rank_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = np.arange(self.dp_rank, self.num_windows, self.dp_size, dtype=np.int64)
        for i in range(0, len(mine), self.batch_size):
            yield _windows(self.data, mine[i:i + self.batch_size] * self.seq_len, self.seq_len)
