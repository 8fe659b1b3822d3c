"""The floor of the touched-row update's access pattern: a coalesced pass (Triton) over what an
update must move, for 80-byte row records (today's layout, three sectors a row) and 64-byte
ones (two sectors), beside the CUDA record kernel of csrc/rows.cu and its own floor, all in
one run.

    python3 bench/gpu_record_floor.py [--json OUT.json]          # GPU
    TRITON_INTERPRET=1 python3 bench/gpu_record_floor.py --check  # CPU: the floor kernel is right

A 64-byte record cannot hold today's state (64 int8 trit accumulators + 13 packed bytes +
exponent + scale accumulator = 79 bytes); it would need 6-bit trit accumulators (48 bytes), which
caps a saturated trit's accumulator at 31 instead of 127: a change of the rule. This measures
what that change could buy before anyone pays for it. The floor kernel does what an update must
at the least: read the row ids and the int32 votes (64 a row, contiguous), read and write each
touched record in place; it adds the row's vote sum to every word so that nothing is optimised
away. Bytes counted as gpu_update.py counts them: 426 a row for the 80-byte record, 394 for the
64-byte one (48 accumulator bytes instead of 64).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_update import ROW_BYTES, _random_state, copy_bandwidth, event_median_ms, host_median_us  # noqa: E402,E501

from arbd.ternary import cuda_rows  # noqa: E402
from arbd.ternary.rule import TUNED_RULE  # noqa: E402

COUNTED = {20: ROW_BYTES, 16: ROW_BYTES - 2 * 16}  # record words -> bytes counted per row


@triton.jit
def _floor_kernel(rec_ptr, ids_ptr, votes_ptr, n, WORDS: tl.constexpr, WORDS_PAD: tl.constexpr,
                  COLS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = r < n
    ids = tl.load(ids_ptr + r, mask=live, other=0)
    c = tl.arange(0, COLS)
    v = tl.load(votes_ptr + r[:, None].to(tl.int64) * COLS + c[None, :], mask=live[:, None],
                other=0)
    total = tl.sum(v, axis=1)
    w = tl.arange(0, WORDS_PAD)
    m = live[:, None] & (w[None, :] < WORDS)
    at = rec_ptr + ids[:, None].to(tl.int64) * WORDS + w[None, :]
    tl.store(at, tl.load(at, mask=m, other=0) + total[:, None], mask=m)


def floor_update(rec: torch.Tensor, ids: torch.Tensor, votes: torch.Tensor, block: int = 32,
                 warps: int = 4) -> None:
    """rec int32 [rows, words]; rec[ids] += votes.sum(1) in place, one pass over each record."""
    words = rec.shape[1]
    n = ids.numel()
    _floor_kernel[(triton.cdiv(n, block),)](rec, ids, votes, n, WORDS=words,
                                            WORDS_PAD=triton.next_power_of_2(words),
                                            COLS=votes.shape[1], BLOCK=block, num_warps=warps)


def check(device: str) -> bool:
    """The floor kernel against torch on ragged sizes, both record widths."""
    g = torch.Generator(device=device).manual_seed(1)
    ok = True
    for rows, u, words in ((1000, 77, 20), (1000, 77, 16), (513, 500, 20), (64, 1, 16)):
        rec = torch.randint(-1000, 1000, (rows, words), generator=g, device=device,
                            dtype=torch.int32)
        ids = torch.randperm(rows, generator=g, device=device)[:u]
        votes = torch.randint(-40, 41, (u, 64), generator=g, device=device, dtype=torch.int32)
        want = rec.clone()
        want[ids] += votes.sum(1, dtype=torch.int32)[:, None]
        floor_update(rec, ids, votes)
        same = torch.equal(rec, want)
        print(f"check rows={rows} touched={u} words={words}: {same}", flush=True)
        ok &= same
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="10000000:1048576,5000000:1048576,5000000:4194304")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true", help="only check the floor kernel")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok = check(dev)
    if args.check or dev != "cuda":
        sys.exit(0 if ok else 1)
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "copy_TB_per_s": bw / 1e12, "checks": ok,
           "results": []}
    print(f"device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)
    for case in args.cases.split(","):
        rows, u = map(int, case.split(":"))
        g = torch.Generator(device=dev).manual_seed(rows + u)
        ids = torch.randperm(rows, generator=g, device=dev)[:u]
        votes = torch.randint(-40, 41, (u, 64), generator=g, device=dev, dtype=torch.int32)
        e_votes = torch.randint(-20, 21, (u,), generator=g, device=dev, dtype=torch.int32)
        runs = {}
        state = _random_state(rows, 64, g, dev, "record")
        for name, kw in (("record kernel (the rule)", {}),
                         ("record kernel, loads and stores only", dict(_memory_only=True))):
            runs[name] = (20, lambda kw=kw: cuda_rows.apply_votes_rows(
                *state, ids, votes, e_votes, TUNED_RULE, kernel="record", **kw))
        recs = {words: torch.randint(-1000, 1000, (rows, words), generator=g, device=dev,
                                     dtype=torch.int32) for words in (20, 16)}
        for words, rec in recs.items():
            for block, warps in ((16, 2), (32, 4), (64, 8)):
                runs[f"Triton floor, {4 * words}-byte records, {block} rows / {warps} warps"] = (
                    words, lambda rec=rec, block=block, warps=warps: floor_update(
                        rec, ids, votes, block, warps))
        for name, (words, call) in runs.items():
            # from an idle device (the host's launch work included), then the device's time alone
            ms = event_median_ms(call, args.reps)
            dms = event_median_ms(call, args.reps, queued=True)
            row = {"rows": rows, "touched": u, "variant": name, "record_bytes": 4 * words,
                   "bytes_counted_per_row": COUNTED[words], "ms": ms,
                   "pct_of_copy_bw": 100 * u * COUNTED[words] / (ms / 1e3) / bw,
                   "device_ms": dms,
                   "device_pct_of_copy_bw": 100 * u * COUNTED[words] / (dms / 1e3) / bw,
                   "host_us": host_median_us(call)}
            out["results"].append(row)
            print(row, flush=True)
        del state, recs
    print("\n| rows | touched | variant | ms | bytes counted / row | % of copy BW | device ms "
          "| device % of copy BW | host us |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in out["results"]:
        print(f"| {r['rows']:,} | {r['touched']:,} | {r['variant']} | {r['ms']:.3f} | "
              f"{r['bytes_counted_per_row']} | {r['pct_of_copy_bw']:.1f}% | {r['device_ms']:.3f} | "
              f"{r['device_pct_of_copy_bw']:.1f}% | {r['host_us']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
