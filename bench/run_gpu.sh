#!/usr/bin/env bash
# Issue 10's whole GPU suite in one command (about 9 minutes on an H100): each target measured
# side by side with its baseline in the same run; PARTS=all adds every GPU-marked test (part
# tests, about 3 more minutes: each bench checks its own results, the tests check the rest):
#   lookup    candidate lookup, 10M x 64, 16,384 queries      (bench/gpu_vq_lookup.py)
#   gather    packed-row gather                               (bench/gpu_gather.py)
#   update    touched-row update on the 10M and 5M codebooks, both state layouts (gpu_update.py)
#   gemm      ternary GEMM forward / backward at M = 8192      (bench/gpu_ternary_check.py)
#   small_m   the M = 16 forward in CUDA graphs, default and tiled kernel (gpu_gemm_small_m.py)
#   dense     the fused dense update of arb-small               (bench/gpu_dense_update.py)
#   step      arb-small ternary against its dense twin (DeepSpeed + Adam, ZeRO-1) at micro-batch
#             128, and arb-3b under a 24 GiB cap with its state per weight (train_step_gpu.py)
# PARTS="lookup gather ..." picks parts (default: all but tests). JSON, logs and gpu_tables.md
# (the tables, a targets table: goal, measured, met, and each part's time) go to $RESULTS_DIR
# (default $OUT when set, else runs/gpu);
# the tables are appended to bench/RESULTS.md unless NO_APPEND=1. The device image has no
# DeepSpeed: the step part installs the wheels in .whl/ds (bench/ds_env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${RESULTS_DIR:-${OUT:-runs/gpu}}
mkdir -p "$DIR"
rm -f "$DIR/parts.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
PARTS=${PARTS:-lookup gather update gemm small_m large_m dense step}
[ "$PARTS" = all ] && PARTS="lookup gather update gemm small_m large_m dense step tests"
MACHINE="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); torch $($PY -c 'import torch, triton; print(torch.__version__, "/ triton", triton.__version__)')"
status=0
part() {  # name, time limit (s), command...: runs it if PARTS names it, logs to $DIR/NAME.log
  local name=$1 lim=$2 t0=$SECONDS rc
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  timeout "$lim" "$@" >"$DIR/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$DIR/parts.txt"
  [ "$rc" = 0 ] || { status=1; tail -n 5 "$DIR/$name.log"; }
}
step() {  # the step part: three training runs, each its own process
  . bench/ds_env.sh || return 1
  local rc=0
  echo "step runs start at ${SECONDS} s"
  $PY bench/train_step_gpu.py ternary --plan shard_plans/h100-arb-small.yaml --micro-batch 128 \
    --warmup 2 --steps 4 --json "$DIR/step_small_ternary.json" || rc=1
  $PY bench/train_step_gpu.py dense --plan shard_plans/h100-arb-small.yaml --micro-batch 128 \
    --warmup 2 --steps 4 --json "$DIR/step_small_dense.json" || rc=1
  echo "arb-3b starts at ${SECONDS} s"
  $PY bench/train_step_gpu.py ternary --plan shard_plans/h100-arb-3b.yaml --mem-cap-gib 24 \
    --warmup 1 --steps 2 --state --json "$DIR/step_3b_cap24.json" || rc=1
  return $rc
}
part lookup 100 $PY bench/gpu_vq_lookup.py --candidates 16,64,128 --json "$DIR/gpu_vq_lookup.json"
part gather 30 $PY bench/gpu_gather.py --json "$DIR/gpu_gather.json"
part update 100 $PY bench/gpu_update.py --layouts arrays,record --touched 262144,1048576 \
  --touched-record 1048576 --json "$DIR/gpu_update.json"
part gemm 120 env OUT="$DIR" $PY bench/gpu_ternary_check.py
part small_m 60 env OUT="$DIR" $PY bench/gpu_gemm_small_m.py --sweep 0 --rounds 5 --ms 16 1 8
part large_m 60 env OUT="$DIR" $PY bench/gpu_gemm_large_m.py --rounds 5
part dense 90 $PY bench/gpu_dense_update.py --model arb-small --reps 5 --json "$DIR/gpu_dense_update.json"
export -f step
export DIR PY
part step 300 bash -c step
part tests 200 env TRITON_INTERPRET=0 $PY -m pytest -q -m "gpu and not slow" tests/ -p no:cacheprovider \
  --durations=15
append=(--append bench/RESULTS.md)
[ "${NO_APPEND:-0}" = 1 ] && append=()
$PY bench/gpu_report.py "$DIR" "${append[@]}" --command "bash bench/run_gpu.sh" --machine "$MACHINE"
echo "suite: ${SECONDS} s, status $status"
exit $status
