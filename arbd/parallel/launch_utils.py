"""Run a function on W local gloo ranks: the harness multi-rank tests and benchmarks share."""
from __future__ import annotations

import gc
import os
import pickle
import socket
import sys
import tempfile
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        del result
    finally:
        # destroy_process_group only unregisters the group; gloo's threads stop when the last
        # Python reference to it goes. Collect fn's garbage first (reference cycles can hold the
        # group) so that happens here, while the interpreter is fully alive.
        gc.collect()
        dist.destroy_process_group()
    # A gloo thread releasing a finished Work may still need the GIL (to drop the Python wrapper
    # of a tensor). Once interpreter shutdown has begun, CPython ends such a thread with
    # pthread_exit inside a noexcept C++ destructor: std::terminate, SIGABRT. The result is
    # written and the group destroyed, so leave without that shutdown in case fn kept a group
    # alive (a module global, say). Only on success: an exception still reaches mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned gloo ranks; returns their results by rank.

    fn must be importable (module level) and return something picklable (tensors are fine)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
