"""Byte corpora: the built-in default (the Python standard library's own sources) and user data.

Why the stdlib: every machine that can run arbd already has it, so a run needs no download, no
network and no licence check, and ~30 MB of real, varied text is plenty for a byte-level model at
the sizes we train. Its content depends on the Python version (and on distro patches), so the
manifest records the version and a fingerprint of the file list, and the cache key includes them.

Layout of a built corpus (one cache sub-directory per source/version/cap):

    train.bin, val.bin  raw bytes: each file's bytes followed by SEPARATOR (0x00), files in
                        sorted POSIX relative-path order
    manifest.json       python version, source, file/byte counts, sha256 of each .bin

Split rule: a file is held out when int(sha1(relpath)[:8 bytes], big endian) % VAL_MODULUS == 0.
It depends on the path alone, so adding, removing or reordering other files never moves a file
between train and val (about 2% of files; 40 of 1790 on CPython 3.11.7).

NUL is the separator because Python source never contains it (the tokenizer rejects it), so it
marks a document boundary that no file can fake.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from arbd.fsutil import fsync_dir, sha256_file

try:  # only to stop ranks on one machine from building the same cache twice; optional
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

SEPARATOR = b"\x00"
VAL_MODULUS = 50
MANIFEST_FORMAT = 1
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
RAW_VAL_FRACTION = 0.02
_MANIFEST = "manifest.json"
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """A byte range [start, stop) of one file; what the loaders read."""

    path: Path
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    def array(self) -> np.ndarray:
        """A read-only uint8 memory map of the range (pages are read on demand)."""
        if self.nbytes == 0:  # np.memmap refuses empty maps
            return np.empty(0, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.start,
                         shape=(self.nbytes,))


@dataclass(frozen=True)
class Corpus:
    """Train and (optional) validation bytes plus a description of where they came from."""

    kind: str  # "stdlib", "dir" (built from a directory of files), "prebuilt" or "file"
    train: Split
    val: Split | None
    manifest: dict[str, Any] = field(compare=False)


# ---------------------------------------------------------------------------------------------
# Sources and the split rule


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_val_file(relpath: str) -> bool:
    """True when the file at this POSIX relative path belongs to the held-out split."""
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % VAL_MODULUS == 0


def list_source_files(root: str | os.PathLike[str],
                      suffixes: Sequence[str] | None = (".py",)) -> list[str]:
    """Sorted POSIX paths (relative to root) of the files a corpus is built from.

    Skips EXCLUDED_DIRS (third-party packages and bytecode are not the stdlib) and hidden
    entries. suffixes=None keeps every regular file. Directory symlinks are not followed, so a
    link loop cannot make the walk infinite.
    """
    root = Path(root)
    keep = tuple(suffixes) if suffixes is not None else None
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (keep is not None and not name.endswith(keep)):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                out.append(Path(os.path.relpath(full, root)).as_posix())
    out.sort()  # str order, independent of the file system's directory order
    return out


def default_cache_dir() -> Path:
    """$ARBD_DATA_DIR if set, else ~/.cache/arbd/corpus (read at call time)."""
    env = os.environ.get("ARBD_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "arbd" / "corpus"


def _python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def _fingerprint(root: Path, files: Sequence[str]) -> str:
    # Paths and sizes only: mtimes differ between identical installs (docker layers, other
    # nodes sharing the cache) and would force pointless rebuilds.
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\t{os.path.getsize(root / rel)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_file(path: Path) -> bytes:
    # Its own function so tests can make a build fail half way.
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Building


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace onto `path`.

    A crash leaves either the old file or a stray temp file, never a partial `path`.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared between users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent, strict=False)


class _CappedWriter:
    """Streams bytes into a file, hashing them and stopping at max_bytes."""

    def __init__(self, f: Any, max_bytes: int | None):
        self.f, self.cap = f, max_bytes
        self.nbytes = 0
        self.files = 0
        self.sha = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.cap is not None and self.nbytes >= self.cap

    def add(self, data: bytes) -> None:
        if self.cap is not None:
            data = data[: self.cap - self.nbytes]  # the last file may be cut: a prefix stream
        self.f.write(data)
        self.sha.update(data)
        self.nbytes += len(data)
        self.files += 1


def _build(out: Path, root: Path, files: Sequence[str], max_bytes: int | None,
           meta: dict[str, Any]) -> dict[str, Any]:
    """Write train.bin, val.bin and (last) the manifest into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    # Retire the old manifest first: while the .bin files are being replaced nothing in the
    # directory vouches for them, so a reader rebuilds instead of trusting a mix.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / _MANIFEST)
    for stale in out.glob(".*.tmp"):  # left by a builder that crashed (we hold the lock)
        with contextlib.suppress(OSError):
            stale.unlink()

    stats: dict[str, dict[str, Any]] = {}
    for split in _SPLITS:
        want_val = split == "val"

        def write(f: Any, want_val: bool = want_val, split: str = split) -> None:
            w = _CappedWriter(f, max_bytes)
            for rel in files:
                if w.full:
                    break
                if is_val_file(rel) == want_val:  # decide before reading: val reads ~2% only
                    w.add(_read_file(root / rel) + SEPARATOR)
            stats[split] = {"files": w.files, "bytes": w.nbytes, "sha256": w.sha.hexdigest()}

        _atomic_write(out / f"{split}.bin", write)

    manifest = dict(meta)
    manifest.update({
        "files": {s: stats[s]["files"] for s in _SPLITS},
        "bytes": {s: stats[s]["bytes"] for s in _SPLITS},
        "sha256": {s: stats[s]["sha256"] for s in _SPLITS},
    })
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / _MANIFEST, lambda f: f.write(text.encode()))
    return manifest


def _manifest_ok(out: Path, meta: dict[str, Any], verify_checksums: bool) -> dict[str, Any] | None:
    """The manifest if the cached build matches `meta` and its files check out, else None."""
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in meta.items()):
        return None  # other Python version, other source files, other cap, older format
    try:
        for split in _SPLITS:
            path = out / f"{split}.bin"
            if path.stat().st_size != manifest["bytes"][split]:
                return None
            if verify_checksums and sha256_file(path) != manifest["sha256"][split]:
                return None
    except (OSError, KeyError, TypeError):
        return None
    return manifest


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(out.parent / f".{out.name}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def _check_cap(max_bytes: int | None) -> None:
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")


def _built_corpus(kind: str, root: Path, suffixes: Sequence[str] | None, cache_dir: Path | None,
                  max_bytes: int | None, rebuild: bool, verify_checksums: bool) -> Corpus:
    _check_cap(max_bytes)
    root = root.resolve()
    files = list_source_files(root, suffixes)
    if not files:
        raise ValueError(f"no source files under {root} (looked for "
                         f"{'any file' if suffixes is None else ', '.join(suffixes)})")
    tag = hashlib.sha1(str(root).encode("utf-8", "surrogateescape")).hexdigest()
    name = f"stdlib-py{_python_version()}-{tag[:8]}" if kind == "stdlib" else f"dir-{tag[:12]}"
    if max_bytes is not None:
        name += f"-max{max_bytes}"
    out = (cache_dir if cache_dir is not None else default_cache_dir()) / name
    meta = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "source": str(root),
        "python_version": _python_version(),
        "python_implementation": sys.implementation.name,
        "separator": SEPARATOR[0],
        "val_rule": f"sha1(relpath)[:8] big-endian % {VAL_MODULUS} == 0",
        "max_bytes_per_split": max_bytes,
        "source_files": len(files),
        "source_fingerprint": _fingerprint(root, files),
    }
    with _locked(out):
        manifest = None if rebuild else _manifest_ok(out, meta, verify_checksums)
        if manifest is None:
            manifest = _build(out, root, files, max_bytes, meta)
    return Corpus(kind=kind,
                  train=Split(out / "train.bin", 0, manifest["bytes"]["train"]),
                  val=Split(out / "val.bin", 0, manifest["bytes"]["val"]),
                  manifest=manifest)


# ---------------------------------------------------------------------------------------------
# Public entry points


def stdlib_corpus(*, cache_dir: str | os.PathLike[str] | None = None,
                  max_bytes: int | None = None, rebuild: bool = False,
                  verify_checksums: bool = False) -> Corpus:
    """The default corpus: this interpreter's stdlib .py sources, built once into the cache.

    max_bytes caps each split to the first max_bytes bytes of its full stream (for tests).
    Reuse checks the manifest against the current Python version and source file list and the
    .bin sizes against the manifest; verify_checksums also re-hashes the .bin files (~0.1 s).
    """
    return _built_corpus("stdlib", stdlib_dir(), (".py",),
                         Path(cache_dir) if cache_dir is not None else None,
                         max_bytes, rebuild, verify_checksums)


def _prefix(split: Split, max_bytes: int | None) -> Split:
    if max_bytes is None:
        return split
    return Split(split.path, split.start, min(split.stop, split.start + max_bytes))


def load_corpus(data: str | os.PathLike[str] | None = None, *,
                cache_dir: str | os.PathLike[str] | None = None, max_bytes: int | None = None,
                rebuild: bool = False, verify_checksums: bool = False,
                val_fraction: float = RAW_VAL_FRACTION) -> Corpus:
    """Resolve a `--data` argument to a Corpus.

    - None: the built-in stdlib corpus (stdlib_corpus).
    - a file: its bytes used as is, no separators added; the last `val_fraction` of it is held
      out as a contiguous tail (0 gives no validation split).
    - a directory holding train.bin: that file (and val.bin when present) used as is.
    - any other directory: every non-hidden file under it, concatenated and split by path
      hash exactly like the stdlib corpus, built into the cache.
    max_bytes caps each split to its first max_bytes bytes in every case.
    """
    _check_cap(max_bytes)
    if data is None:
        return stdlib_corpus(cache_dir=cache_dir, max_bytes=max_bytes, rebuild=rebuild,
                             verify_checksums=verify_checksums)
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {str(path)!r} does not exist. Pass a raw byte/text file, a directory of "
            f"files, or a directory holding train.bin (and optionally val.bin); or leave --data "
            f"out to use the built-in corpus (this Python's standard-library sources).")
    if path.is_dir():
        if (path / "train.bin").is_file():
            train = Split(path / "train.bin", 0, (path / "train.bin").stat().st_size)
            val_path = path / "val.bin"
            val = Split(val_path, 0, val_path.stat().st_size) if val_path.is_file() else None
            return Corpus(kind="prebuilt", train=_prefix(train, max_bytes),
                          val=None if val is None else _prefix(val, max_bytes),
                          manifest={"kind": "prebuilt", "source": str(path.resolve())})
        return _built_corpus("dir", path, None,
                             Path(cache_dir) if cache_dir is not None else None,
                             max_bytes, rebuild, verify_checksums)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    size = path.stat().st_size
    n_val = int(size * val_fraction)
    train = Split(path, 0, size - n_val)
    val = Split(path, size - n_val, size) if n_val > 0 else None
    return Corpus(kind="file", train=_prefix(train, max_bytes),
                  val=None if val is None else _prefix(val, max_bytes),
                  manifest={"kind": "file", "source": str(path.resolve()), "bytes": size,
                            "val_fraction": val_fraction})


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m arbd.data [--data PATH]`: build (or check) a corpus and describe it."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data", default=None, help="file or directory; default: stdlib sources")
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-hash the cached .bin files")
    args = p.parse_args(argv)
    c = load_corpus(args.data, max_bytes=args.max_bytes, rebuild=args.rebuild,
                    verify_checksums=args.verify)
    print(json.dumps({"kind": c.kind, "train": [str(c.train.path), c.train.nbytes],
                      "val": None if c.val is None else [str(c.val.path), c.val.nbytes],
                      "manifest": c.manifest}, indent=2, sort_keys=True))

