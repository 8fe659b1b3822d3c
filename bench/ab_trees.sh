#!/usr/bin/env bash
# Run one bench command in two source trees alternately (A B A B ...) in one device call, so that
# both see the same host: step times move by up to ~20% between calls (bench/RESULTS.md), so only
# ratios within a call are compared. A is typically a worktree of an older commit:
#   git worktree add --detach .wtA <commit>     (carry .wtA to the device; remove it afterwards)
#   AB_A=.wtA AB_ROUNDS=2 bash bench/ab_trees.sh python3 bench/profile_step.py --micro-batch 32
# Each run's output goes to $OUT/ab_<tree>_<round>.log (OUT defaults to runs/ab) and its last
# AB_TAIL lines (default 12) to stdout.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-runs/ab}
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
mkdir -p "$OUT"
A=${AB_A:?set AB_A to the older tree}
B=${AB_B:-.}
. bench/ds_env.sh
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for tree in A B; do
    dir=$A
    [ "$tree" = B ] && dir=$B
    log="$OUT/ab_${tree}_${round}.log"
    (cd "$dir" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${AB_TIMEOUT:-200}" "$@") >"$log" 2>&1
    echo "=== $tree round $round rc=$? ($dir, ${SECONDS}s): $*"
    tail -n "${AB_TAIL:-12}" "$log"
  done
done
