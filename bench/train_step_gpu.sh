#!/usr/bin/env bash
# Issue 10's training-step targets in one device run (about 5-7 minutes on an H100):
#   arb-small ternary vs its dense bf16 twin (DeepSpeed + Adam, ZeRO-1), plan h100-arb-small, at
#   the plan's micro-batch (32) and at 128, the twin's largest on 80 GB, where the pair is met
#   (bench/RESULTS.md, nineteenth session);
#   arb-3b under a 24 GiB cap (plan h100-arb-3b: context 2048, micro-batch 1), evidence probe,
#   persistent state per weight; then the same arb-small pair at micro-batch 1 if time is left.
# Results: $OUT/*.json, $OUT/all.log, $OUT/report.md (OUT defaults to runs/train_step_gpu).
# The device image has no DeepSpeed: wheels in .whl/ds are installed to /tmp/site if present.
# TSG_SMALL / TSG_BIG / TSG_MB1 append arguments to the runs (a CPU smoke test shrinks them).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/train_step_gpu}
mkdir -p "$OUT"
. bench/ds_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
date -u
run() {  # name, time limit (s), arguments
  local name=$1 lim=$2
  shift 2
  echo "=== $name: $*" >>"$OUT/all.log"
  timeout "$lim" python3 bench/train_step_gpu.py "$@" --json "$OUT/$name.json" >>"$OUT/all.log" 2>&1
  echo "$name rc=$? at ${SECONDS}s"
}
run small_ternary 140 ternary --plan shard_plans/h100-arb-small.yaml ${TSG_SMALL:-}
run small_dense 140 dense --plan shard_plans/h100-arb-small.yaml ${TSG_SMALL:-}
run small_ternary_mb128 140 ternary --plan shard_plans/h100-arb-small.yaml --micro-batch 128 ${TSG_SMALL:-}
run small_dense_mb128 140 dense --plan shard_plans/h100-arb-small.yaml --micro-batch 128 ${TSG_SMALL:-}
run 3b_ternary_cap24 230 ternary --plan shard_plans/h100-arb-3b.yaml --mem-cap-gib 24 --warmup 1 \
  --steps 2 --evidence-probe --state ${TSG_BIG:-}
if [ "$SECONDS" -lt "${TSG_MB1_BEFORE:-390}" ]; then
  run small_ternary_mb1 60 ternary --plan shard_plans/h100-arb-small.yaml --micro-batch 1 \
    --warmup 1 --steps 3 ${TSG_MB1:-}
  run small_dense_mb1 60 dense --plan shard_plans/h100-arb-small.yaml --micro-batch 1 \
    --warmup 1 --steps 3 ${TSG_MB1:-}
fi
grep -E "Error|error|Traceback" "$OUT/all.log" | grep -v "^ *\"" | tail -n 20
python3 bench/train_step_gpu.py report "$OUT"/*.json | tee "$OUT/report.md"
