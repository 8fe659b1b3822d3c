"""Activation checkpointing, in one place for ARBModel and MoEGraph (docs/decisions.md,
"activation checkpointing"), with optional offloading of the kept inputs to host memory."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.utils.checkpoint

# Inputs smaller than this stay on the GPU: a copy's fixed cost outweighs what it frees.
OFFLOAD_MIN_BYTES = 1 << 20
_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


class PinnedPool:
    """Pinned host buffers that outlive the offloaded tensors they held.

    A new pinned allocation page-locks its memory and takes milliseconds (about 1 GB/s on the
    H100 host), and torch's pinned-memory cache still allocated in steady state at arb-small
    (bench/RESULTS.md), so offload takes its buffers from here. A request takes the smallest
    idle buffer that fits and is at most twice its size (or the size it would allocate), so
    that the ACT steps' row counts, which change from micro-batch to micro-batch, still find
    one; a new buffer has a quarter more room than asked. A buffer goes back with the event
    after which nothing reads it any more, and is handed out again only once that event has
    passed. Idle buffers beyond twice the most ever in use at once are freed, oldest first.
    `allocate(nbytes)` and the events (anything with query()) are arguments for tests."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] | None = None) -> None:
        self._allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self._idle: list[tuple[torch.Tensor, Any]] = []   # (buffer, last-use event), oldest first
        self.in_use = 0          # bytes handed out and not yet given back
        self.peak_in_use = 0
        self.allocations = 0     # buffers ever allocated (a test reads it)

    @staticmethod
    def size_class(nbytes: int) -> int:
        step = 1 << max(12, nbytes.bit_length() - 4)
        return -(-nbytes // step) * step

    def idle_bytes(self) -> int:
        return sum(b.numel() for b, _ in self._idle)

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least nbytes: the smallest idle one whose reader has finished, if it is
        at most twice as large (a new pinned allocation costs milliseconds), else a new one."""
        best, fresh = None, self.size_class(nbytes + nbytes // 4)   # a new one has room to grow
        limit = max(2 * nbytes, fresh)
        for i, (buf, done) in enumerate(self._idle):
            size = buf.numel()
            if nbytes <= size <= limit and (best is None or size < self._idle[best][0].numel()) \
                    and (done is None or done.query()):
                best = i
        if best is not None:
            buf = self._idle.pop(best)[0]
        else:
            buf = self._allocate(fresh)
            self.allocations += 1
        self.in_use += buf.numel()
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buf

    def give(self, buf: torch.Tensor, done: Any) -> None:
        """buf back, free to reuse once `done` (an event, or None) has passed."""
        self.in_use -= buf.numel()
        self._idle.append((buf, done))
        idle = self.idle_bytes()
        while self._idle and idle > 2 * self.peak_in_use:
            idle -= self._idle.pop(0)[0].numel()


_pinned_pool = PinnedPool()


def _pinned_like(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer from the pool, a pinned view of it shaped and typed like a)."""
    nbytes = a.numel() * a.element_size()
    buf = _pinned_pool.take(nbytes)
    return buf, buf[:nbytes].view(a.dtype).view(a.shape)


def maybe_recompute(enabled: bool, fn: Callable[..., Any], *args: Any, offload: bool = False) -> Any:
    """fn(*args); when `enabled` and autograd records, keep only the inputs and run fn again in
    backward (non-reentrant, so outputs that need no grad and keyword-free closures are fine).
    With `offload`, the kept CUDA inputs of 1 MiB or more wait in pinned host memory instead
    of on the GPU between this forward and the recomputation (HostInputs)."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    if not offload:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    held = HostInputs(args)
    # The region sees its inputs through `held`, so the checkpoint itself keeps none of them;
    # the anchor tells it which device's random state to restore for the recomputation.
    anchor = next((a.new_empty(0) for a in args if isinstance(a, torch.Tensor)), None)
    out = torch.utils.checkpoint.checkpoint(lambda _anchor: fn(*held.values()), anchor,
                                            use_reentrant=False)
    held.offload()
    return out


class HostInputs:
    """A recomputed region's arguments. offload() copies the large CUDA tensors among them to
    pinned host memory on a side stream and lets go of the GPU copies (the caching allocator
    reuses their memory once the copy is done: record_stream); values() gives the arguments
    back on the GPU. The values are bit-identical, so the recomputation equals the one from
    GPU-held inputs.

    Backward recomputes the regions in the reverse of their forward order, so when one region
    asks for its inputs, the copy back of the region offloaded just before it starts on the side
    stream: it runs while this region recomputes and back-propagates, and one region's inputs
    at most wait on the GPU ahead of time."""

    _offloaded: list[weakref.ref] = []   # in forward order; dead or used entries are dropped

    def __init__(self, args: tuple) -> None:
        self.args = list(args)
        self.host: dict[int, tuple[torch.Tensor, bool]] = {}
        self.buffers: list[torch.Tensor] = []   # the pool's buffers behind self.host
        self.done: torch.cuda.Event | None = None
        self.read: torch.cuda.Event | None = None   # after the last copy out of the buffers
        self.early: tuple[list, torch.cuda.Event] | None = None   # a prefetch: tensors, event
        self.used = False

    def offload(self) -> None:
        big = [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor) and a.is_cuda
               and a.numel() * a.element_size() >= OFFLOAD_MIN_BYTES]
        if not big:
            return
        side = _copy_stream(self.args[big[0]].device)
        side.wait_stream(torch.cuda.current_stream(side.device))   # the inputs are written by then
        with torch.cuda.stream(side):
            for i in big:
                a = self.args[i]
                buf, h = _pinned_like(a)
                self.buffers.append(buf)
                h.copy_(a.detach(), non_blocking=True)
                a.record_stream(side)
                self.host[i] = (h, a.requires_grad)
                self.args[i] = a.device
        self.done = side.record_event()
        HostInputs._offloaded.append(weakref.ref(self))

    def _device(self) -> torch.device:
        return self.args[next(iter(self.host))]

    def _to_gpu(self) -> list[torch.Tensor]:
        """The host copies back on the current stream; the buffers may be reused after that."""
        gpu = [h.to(self.args[i], non_blocking=True) for i, (h, _) in self.host.items()]
        self.read = torch.cuda.current_stream(self._device()).record_event()
        return gpu

    def __del__(self) -> None:
        # Back to the pool once nothing reads them: after the last copy back if there was one,
        # else after the copy out (a forward whose backward never ran).
        for buf in self.buffers:
            if _pinned_pool is not None:   # None only while the interpreter shuts down
                _pinned_pool.give(buf, self.read or self.done)
        self.buffers = []

    def values(self) -> list:
        if self.done is None:
            return self.args
        self.used = True
        cur = torch.cuda.current_stream(self._device())
        if self.early is not None:
            # dropped here, so that the GPU copies live only as long as the recomputation needs
            (gpu, ready), self.early = self.early, None
            cur.wait_event(ready)
            for t in gpu:
                t.record_stream(cur)   # made on the side stream, used on this one
        else:
            cur.wait_event(self.done)
            gpu = self._to_gpu()
        self._prefetch_previous(cur.device)
        out = list(self.args)
        for (i, (_, grad)), t in zip(self.host.items(), gpu):
            out[i] = t.requires_grad_() if grad else t
        return out

    def _prefetch_previous(self, device: torch.device) -> None:
        stack, prev = HostInputs._offloaded, None
        while stack:
            prev = stack[-1]()
            if prev is not None and not prev.used:
                break
            stack.pop()
            prev = None
        if prev is None or prev.early is not None or prev._device() != device:
            return
        side = _copy_stream(device)
        side.wait_event(prev.done)
        with torch.cuda.stream(side):
            gpu = prev._to_gpu()
        prev.early = (gpu, side.record_event())


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]
