"""Activation checkpointing, in one place for ARBModel and MoEGraph (docs/decisions.md,
"activation checkpointing")."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils.checkpoint


def maybe_recompute(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args); when `enabled` and autograd records, keep only the inputs and run fn again in
    backward (non-reentrant, so outputs that need no grad and keyword-free closures are fine)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
