#!/usr/bin/env bash
# arb-small ternary vs its dense bf16 twin at several micro-batch sizes, same global batch
# (issue 10). A ternary micro-batch is bound by host launch cost (bench/profile_step.py), so its
# tokens/s depends on the micro-batch size far more than the dense twin's; this shows by how much.
#   TSB_MICRO="8:4 16:2 32:1" (micro-batch:grad-accum pairs), TSB_CKPT="32:1" (pairs also run
#   with activation checkpointing; empty to skip). Results: $OUT/*.json, $OUT/report.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/train_step_batch}
mkdir -p "$OUT"
. bench/ds_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
run() {  # name, arguments
  local name=$1
  shift
  echo "=== $name: $*" >>"$OUT/all.log"
  timeout 150 python3 bench/train_step_gpu.py "$@" --json "$OUT/$name.json" >>"$OUT/all.log" 2>&1
  echo "$name rc=$? at ${SECONDS}s"
}
PLAN="--plan shard_plans/h100-arb-small.yaml ${TSB_ARGS:-}"
for pair in ${TSB_MICRO:-8:4 16:2 32:1}; do
  mb=${pair%:*} acc=${pair#*:}
  run "ternary_mb$mb" ternary $PLAN --micro-batch "$mb" --grad-accum "$acc" --activation-checkpointing off
  run "dense_mb$mb" dense $PLAN --micro-batch "$mb" --grad-accum "$acc"
done
for ck in ${TSB_CKPT-32:1}; do
  run "ternary_mb${ck%:*}_ckpt" ternary $PLAN --micro-batch "${ck%:*}" --grad-accum "${ck#*:}" \
    --activation-checkpointing on
done
grep -E "Error|Traceback" "$OUT/all.log" | tail -n 10
python3 bench/train_step_gpu.py report "$OUT"/*.json | tee "$OUT/report.md"
