"""Durable-file helpers shared by the corpus cache and the checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path, *, strict: bool = True) -> None:
    """Make a rename inside `path` durable. strict=False skips file systems that cannot open a
    directory (fine for a cache that is rebuilt on mismatch; checkpoints stay strict)."""
    with contextlib.suppress(OSError) if not strict else contextlib.nullcontext():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
