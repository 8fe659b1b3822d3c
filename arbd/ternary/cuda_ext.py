"""Hand-written CUDA kernels (csrc/*.cu): built with the machine's nvcc, loaded with ctypes.

No torch C++ headers are involved, so a build takes seconds and a rank that finds the library
already built just loads it. Libraries live in a cache directory (ARBD_EXT_DIR, default
~/.cache/arbd/ext) under a name keyed by the source, the flags, the nvcc version and the GPU
architecture. Builds write to a temporary name and rename, so ranks that build at once never see
a half-written file.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")


def switch(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The value of environment switch `name`, checked against `choices`."""
    value = os.environ.get(name, default).lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def build(source: Path, arch: str) -> Path:
    """Compile `source` for sm_<arch> into the cache (once per source, flags, nvcc and arch) and
    return the library's path."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
             f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256((source.read_text() + " ".join(flags) + version).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ARBD_EXT_DIR") or Path.home() / ".cache" / "arbd" / "ext")
    target = cache / f"{source.stem}_sm{arch}_{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# Sources that use architecture-specific instructions (wgmma): built for sm_90a, not sm_90. Such a
# build runs on that architecture only, so their Python wrappers check for exactly (9, 0).
ARCH_SPECIFIC = frozenset({"large_m"})


def arch_for(source: Path, arch: str) -> str:
    """The build target of `source` for architecture `arch` ("90" or "90a")."""
    return arch + "a" if source.stem in ARCH_SPECIFIC else arch


def load(source: Path, device: torch.device) -> ctypes.CDLL:
    """Build (if needed) and load `source` for `device`'s architecture."""
    major, minor = device_info(device)[0]
    return ctypes.CDLL(str(build(source, arch_for(source, f"{major}{minor}"))))


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device) -> tuple[tuple[int, int], int, int]:
    """(compute capability, multiprocessor count, shared memory a block may opt in to)."""
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count, props.shared_memory_per_block_optin
