#!/usr/bin/env bash
# The whole GPU suite in one command (about 4 minutes on an H100): GPU-marked tests of the Triton
# kernels, then candidate lookup, packed-row gather, touched-row update and ternary GEMM benches.
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
$PY -m pytest -q -m gpu tests/test_gpu_vq_lookup.py || status=1
$PY bench/gpu_vq_lookup.py --json "$DIR/gpu_vq_lookup.json" || status=1
$PY bench/gpu_gather.py --json "$DIR/gpu_gather.json" || status=1
$PY bench/gpu_update.py --json "$DIR/gpu_update.json" || status=1
OUT="$DIR" $PY bench/gpu_ternary_check.py > "$DIR/gpu_ternary_check.log" 2>&1 || status=1
append=(--append bench/RESULTS.md)
[ "${NO_APPEND:-0}" = 1 ] && append=()
$PY bench/gpu_report.py "$DIR" "${append[@]}" --command "bash bench/run_gpu.sh" --machine "$MACHINE"
exit $status
