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
        self.done: torch.cuda.Event | None = None
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
                h = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
                h.copy_(a.detach(), non_blocking=True)
                a.record_stream(side)
                self.host[i] = (h, a.requires_grad)
                self.args[i] = a.device
        self.done = side.record_event()
        HostInputs._offloaded.append(weakref.ref(self))

    def _device(self) -> torch.device:
        return self.args[next(iter(self.host))]

    def _to_gpu(self) -> list[torch.Tensor]:
        return [h.to(self.args[i], non_blocking=True) for i, (h, _) in self.host.items()]

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
