"""Tests for arbd.data: corpus build/caching/splitting and the deterministic byte loaders."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arbd.data.corpus as corpus_mod
from arbd.data import (
    SEPARATOR,
    ByteBatches,
    ValWindows,
    is_val_file,
    list_source_files,
    load_corpus,
    sample_offsets,
    stdlib_corpus,
    stdlib_dir,
)

CAP = 200_000  # bytes per split: enough files for both splits, builds in well under 0.1 s


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Never touch the user's ~/.cache from tests.
    d = tmp_path / "cache"
    monkeypatch.setenv("ARBD_DATA_DIR", str(d))
    return d


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_tree(root: Path, n: int) -> dict[str, bytes]:
    """n small files with unique contents, in nested dirs, created in non-sorted order."""
    files = {}
    for i in reversed(range(n)):
        rel = f"d{i % 7}/f{i:04d}.txt"
        data = f"file {i} ".encode() * (1 + i % 5)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    return files


def _expected(files: dict[str, bytes], val: bool) -> bytes:
    return b"".join(files[r] + SEPARATOR for r in sorted(files) if is_val_file(r) == val)


# ------------------------------------------------------------------------------ corpus


def test_stdlib_listing_is_sorted_py_only_without_third_party() -> None:
    files = list_source_files(stdlib_dir())
    assert len(files) > 500
    assert files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    bad = {"site-packages", "dist-packages", "__pycache__"}
    assert not [f for f in files if bad & set(f.split("/"))]


def test_stdlib_build_is_deterministic_and_manifest_matches(tmp_path: Path) -> None:
    a = stdlib_corpus(cache_dir=tmp_path / "a", max_bytes=CAP)
    b = stdlib_corpus(cache_dir=tmp_path / "b", max_bytes=CAP)
    assert a.train.path != b.train.path
    for split in ("train", "val"):
        pa, pb = getattr(a, split).path, getattr(b, split).path
        assert _sha(pa) == _sha(pb) == a.manifest["sha256"][split]
        assert pa.stat().st_size == a.manifest["bytes"][split] == CAP
    m = json.loads((a.train.path.parent / "manifest.json").read_text())
    assert m["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert m["separator"] == 0 and m["files"]["val"] > 0 and m["files"]["train"] > 0


def test_stdlib_bins_are_file_concatenations_split_by_path() -> None:
    root = stdlib_dir()
    files = list_source_files(root)
    val = [f for f in files if is_val_file(f)]
    train = [f for f in files if not is_val_file(f)]
    assert not set(val) & set(train)
    assert 0.01 < len(val) / len(files) < 0.04  # the ~2% target
    c = stdlib_corpus(max_bytes=CAP)
    for names, split in ((train, c.train), (val, c.val)):
        expect = b"".join((root / f).read_bytes() + SEPARATOR for f in names[:40])[:CAP]
        assert split.path.read_bytes() == expect


def test_split_depends_only_on_path_not_on_other_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_tree(src, 300)
    c = load_corpus(src)
    assert c.kind == "dir"
    assert c.val.path.read_bytes() == _expected(files, val=True) != b""
    assert c.train.path.read_bytes() == _expected(files, val=False)
    assert c.manifest["files"]["val"] + c.manifest["files"]["train"] == 300
    # Drop two thirds of the files: the survivors keep their split (and the cache notices).
    for i, rel in enumerate(sorted(files)):
        if i % 3:
            (src / rel).unlink()
            del files[rel]
    c2 = load_corpus(src)
    assert c2.manifest["files"]["val"] + c2.manifest["files"]["train"] == 100
    assert c2.val.path.read_bytes() == _expected(files, val=True)
    assert c2.train.path.read_bytes() == _expected(files, val=False)


def test_truncated_or_corrupted_bin_is_rebuilt() -> None:
    c = stdlib_corpus(max_bytes=CAP)
    good = _sha(c.train.path)
    c.train.path.write_bytes(c.train.path.read_bytes()[: CAP // 2])  # truncated
    c2 = stdlib_corpus(max_bytes=CAP)
    assert _sha(c2.train.path) == good
    raw = bytearray(c.val.path.read_bytes())
    raw[10] ^= 0xFF  # same size, wrong content: only the checksum pass sees it
    c.val.path.write_bytes(bytes(raw))
    c3 = stdlib_corpus(max_bytes=CAP, verify_checksums=True)
    assert _sha(c3.val.path) == c3.manifest["sha256"]["val"]


def test_crash_during_build_leaves_nothing_that_looks_valid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    good = stdlib_corpus(max_bytes=CAP)
    out = good.train.path.parent
    good_sha = _sha(good.train.path)
    calls = {"n": 0}
    real = corpus_mod._read_file

    def flaky(path: Path) -> bytes:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk on fire")
        return real(path)

    monkeypatch.setattr(corpus_mod, "_read_file", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        stdlib_corpus(max_bytes=CAP, rebuild=True)
    assert not (out / "manifest.json").exists()  # nothing vouches for the directory
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert _sha(good.train.path) == good_sha  # the old file was never partly overwritten
    monkeypatch.setattr(corpus_mod, "_read_file", real)
    again = stdlib_corpus(max_bytes=CAP)
    assert (out / "manifest.json").exists() and _sha(again.train.path) == good_sha


def test_manifest_from_other_python_version_triggers_rebuild() -> None:
    c = stdlib_corpus(max_bytes=CAP)
    mpath = c.train.path.parent / "manifest.json"
    m = json.loads(mpath.read_text())
    m["python_version"] = "2.7.18"
    mpath.write_text(json.dumps(m))
    c2 = stdlib_corpus(max_bytes=CAP)
    assert c2.manifest["python_version"] != "2.7.18"
    assert json.loads(mpath.read_text())["python_version"] != "2.7.18"


def test_raw_file_and_prebuilt_dir_used_as_is(tmp_path: Path) -> None:
    raw = bytes(range(256)) * 40
    f = tmp_path / "data.txt"
    f.write_bytes(raw)
    c = load_corpus(f)
    assert c.kind == "file"
    n_val = int(len(raw) * 0.02)
    assert bytes(c.train.array()) == raw[: len(raw) - n_val]
    assert bytes(c.val.array()) == raw[len(raw) - n_val:]
    assert bytes(load_corpus(f, max_bytes=100).train.array()) == raw[:100]
    assert load_corpus(f, val_fraction=0.0).val is None
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "train.bin").write_bytes(b"abc" * 10)
    (pre / "val.bin").write_bytes(b"xyz" * 10)
    p = load_corpus(pre)
    assert p.kind == "prebuilt"
    assert bytes(p.train.array()) == b"abc" * 10 and bytes(p.val.array()) == b"xyz" * 10


def test_missing_data_path_error_names_path_and_alternatives(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError) as e:
        load_corpus(missing)
    msg = str(e.value)
    assert str(missing) in msg and "train.bin" in msg and "built-in" in msg


def test_bad_max_bytes() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus(max_bytes=0)


# ------------------------------------------------------------------------------ loader


def _data(n: int = 5000, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_targets_are_inputs_shifted_and_windows_come_from_data() -> None:
    data = _data()
    bb = ByteBatches(data, seq_len=16, micro_batch=4, seed=7)
    x, y = next(bb)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = sample_offsets(np.arange(4), seed=7, num_starts=len(data) - 16)
    for row, s in enumerate(starts):
        assert x[row].tolist() == data[s:s + 16].tolist()
        assert y[row].tolist() == data[s + 1:s + 17].tolist()


def test_sample_content_depends_only_on_seed_and_index() -> None:
    data = _data()
    a = ByteBatches(data, 8, micro_batch=6, seed=3)
    b = ByteBatches(data, 8, micro_batch=2, grad_accum=3, seed=3)
    xa, _ = next(a)
    xb = torch.cat([next(b)[0] for _ in range(3)])
    assert torch.equal(xa, xb)
    other = ByteBatches(data, 8, micro_batch=6, seed=4)
    assert not torch.equal(xa, next(other)[0])
    assert len(set(sample_offsets(np.arange(1000), 0, 4000).tolist())) > 800  # spread out


@pytest.mark.parametrize("b", [1, 3])
def test_dp2_matches_dp1_with_accumulation(b: int) -> None:
    data = _data()
    dp1 = ByteBatches(data, 12, b, grad_accum=2, seed=5)
    ranks = [ByteBatches(data, 12, b, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for _ in range(4):  # steps
        for r in range(2):
            x1, y1 = next(dp1)
            x2, y2 = next(ranks[r])
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # The general layout: dp=2, g=2 equals dp=4, g=1 rank by rank.
    dp2 = [ByteBatches(data, 12, b, grad_accum=2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    dp4 = [ByteBatches(data, 12, b, dp_rank=r, dp_size=4, seed=5) for r in range(4)]
    for m in range(2):
        for r in range(2):
            assert torch.equal(next(dp2[r])[0], next(dp4[m * 2 + r])[0])


def test_resume_continues_exactly() -> None:
    data = _data()
    straight = ByteBatches(data, 10, 3, grad_accum=3, seed=11)
    ref = [next(straight) for _ in range(12)]
    first = ByteBatches(data, 10, 3, grad_accum=3, seed=11)
    for _ in range(5):  # stops mid-step (5 = 1 step + 2 micro-steps)
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint
    assert (state["step"], state["micro_step"]) == (1, 2)
    resumed = ByteBatches(data, 10, 3, grad_accum=3, seed=11)
    resumed.load_state_dict(state)
    for want in ref[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_at_step_boundary_with_other_dp_split() -> None:
    data = _data()
    dp1 = ByteBatches(data, 10, 2, grad_accum=2, seed=1)
    for _ in range(4):
        next(dp1)
    state = dp1.state_dict()
    ref = [next(dp1) for _ in range(2)]
    for r in range(2):
        rank = ByteBatches(data, 10, 2, dp_rank=r, dp_size=2, seed=1)
        rank.load_state_dict(state)
        assert torch.equal(next(rank)[0], ref[r][0])


def test_resume_refuses_incompatible_state() -> None:
    data = _data()
    a = ByteBatches(data, 10, 2, seed=1)
    next(a)
    with pytest.raises(ValueError, match="seed"):
        ByteBatches(data, 10, 2, seed=2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="data_bytes"):
        ByteBatches(data[:-1], 10, 2, seed=1).load_state_dict(a.state_dict())
    b = ByteBatches(data[:-1], 10, 2, seed=1)
    b.load_state_dict(a.state_dict(), strict=False)
    assert b.step == 1


def test_loader_argument_errors_name_expected_and_given() -> None:
    data = _data(100)
    with pytest.raises(ValueError, match=r"seq_len=100 needs at least .* 101 .* got 100"):
        ByteBatches(data, 100, 1)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, dp_size=2\), got 2"):
        ByteBatches(data, 10, 1, dp_rank=2, dp_size=2)
    for kw in ({"seq_len": 0}, {"micro_batch": -1}, {"grad_accum": 0}, {"dp_size": 0}):
        args = {"seq_len": 10, "micro_batch": 1, **kw}
        name, value = next(iter(kw.items()))
        with pytest.raises(ValueError, match=rf"{name} must be a positive int, got {value}"):
            ByteBatches(data, **args)
    with pytest.raises(ValueError, match="needs at least"):
        ValWindows(data, 100, 4)
    with pytest.raises(ValueError, match=r"max_windows=1 \(--val-windows\) .* use at least 2"):
        ValWindows(np.zeros(10_000, np.uint8), 10, 1, dp_size=2, max_windows=1)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        ByteBatches("/nonexistent/missing.bin", 10, 1)


def test_val_windows_cover_file_once_and_shard_evenly() -> None:
    data = _data(1000)
    L = 16
    v = ValWindows(data, L, batch_size=5)
    assert v.num_windows == (1000 - 1) // L and v.total_targets == v.num_windows * L
    xs, ys = zip(*v)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(xs) == len(v)
    assert x.flatten().tolist() == data[: v.total_targets].tolist()
    assert y.flatten().tolist() == data[1: v.total_targets + 1].tolist()  # each byte once
    assert torch.equal(torch.cat([b[0] for b in v]), x)  # re-iterable, same every time
    shards = [ValWindows(data, L, 5, dp_rank=r, dp_size=4) for r in range(4)]
    assert len({len(s) for s in shards}) == 1  # equal forward passes on every rank
    rows = sorted(tuple(row) for s in shards for b in s for row in b[0].tolist())
    assert len(rows) == shards[0].num_windows == v.num_windows - v.num_windows % 4
    assert rows == sorted(tuple(row) for row in x[: len(rows)].tolist())


def test_loaders_read_a_built_corpus_via_memmap() -> None:
    c = stdlib_corpus(max_bytes=CAP)
    arr = c.train.array()
    assert isinstance(arr, np.memmap) and len(arr) == CAP
    x, y = next(ByteBatches(c.train, 64, 2, seed=0))
    assert x.shape == (2, 64) and int(x.max()) < 256
    vx, _ = next(iter(ValWindows(c.val, 64, 2)))
    assert vx[0].tolist() == list(c.val.path.read_bytes()[:64])
