#!/usr/bin/env bash
# The whole GPU suite in one command (about 6 minutes on an H100): every GPU-marked test, then
# candidate lookup, packed-row gather, touched-row update, ternary GEMM and dense-update benches
# (the last one prints its own tables into $DIR/gpu_dense_update.log).
# JSON and gpu_tables.md go to $RESULTS_DIR (default $OUT when set, else runs/gpu); the tables
# are appended to bench/RESULTS.md unless NO_APPEND=1.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${RESULTS_DIR:-${OUT:-runs/gpu}}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
MACHINE="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); torch $($PY -c 'import torch, triton; print(torch.__version__, "/ triton", triton.__version__)')"
status=0
TRITON_INTERPRET=0 $PY -m pytest -q -m "gpu and not slow" tests/ -p no:cacheprovider || status=1
$PY bench/gpu_vq_lookup.py --json "$DIR/gpu_vq_lookup.json" || status=1
$PY bench/gpu_gather.py --json "$DIR/gpu_gather.json" || status=1
$PY bench/gpu_update.py --json "$DIR/gpu_update.json" || status=1
OUT="$DIR" $PY bench/gpu_ternary_check.py > "$DIR/gpu_ternary_check.log" 2>&1 || status=1
$PY bench/gpu_dense_update.py --model arb-small --reps 10 --json "$DIR/gpu_dense_update.json" \
  > "$DIR/gpu_dense_update.log" 2>&1 || status=1
append=(--append bench/RESULTS.md)
[ "${NO_APPEND:-0}" = 1 ] && append=()
$PY bench/gpu_report.py "$DIR" "${append[@]}" --command "bash bench/run_gpu.sh" --machine "$MACHINE"
exit $status
