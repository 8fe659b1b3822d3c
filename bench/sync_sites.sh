#!/usr/bin/env bash
# Host->device synchronisations of one training step, by arbd call site, at world 1 and at world
# 2 (or WORLDS; SYNC_TP sets the tensor-parallel size, dp = ep = world / tp) on ONE GPU (issue
# 11: the 2-GPU step was bound by 314 syncs, not by NCCL).
#
#   OUT=dir [WORLDS="1 2"] [SYNC_TP=1] [CPROFILE=1 ROWS=40] bash bench/sync_sites.sh   # $OUT/sync<w>.json
#   OUT=dir TIMING=1 [STEPS=12] [TIMING_TIMEOUT=s] bash bench/sync_sites.sh   # plain step times
#   (a run that hangs: ARBD_STALL_DUMP_S=60 makes every rank print its stacks each minute)
#
# World 2 runs both ranks on GPU 0 with ARBD_CUDA_BACKEND=gloo (NCCL refuses two ranks on one
# device): the multi-rank code paths and their syncs are those of an NCCL run; the times are not
# (gloo copies CUDA tensors through host memory). Plans as bench/run_multi_gpu.sh's PROFILE step:
# arb-small, seq 512, bf16, micro-batch 4 per rank, dp = ep = world, codebooks over all ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sync_sites}
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore
. bench/ds_env.sh
. bench/plans.sh
layout() {  # world -> the plan file: dp = ep = world / tp, tp = SYNC_TP (1 below that world)
  local tp=$(( $1 >= ${SYNC_TP:-1} ? ${SYNC_TP:-1} : 1 ))
  plan "sync$1" $(( $1 / tp )) "$tp" $(( $1 / tp )) "${SYNC_MICRO:-4}" 1
}
if [ "${TIMING:-0}" = 1 ]; then
  # Plain training steps instead (no counters): launch/pretrain.py at world 1 and 2 (both ranks on
  # GPU 0 over gloo), median step time over steps 4..STEPS. For A/B of two trees in one call
  # (bench/ab_trees.sh): the gloo copies are in both, so only the difference means something.
  for w in ${WORLDS:-1 2}; do
    ARBD_CUDA_BACKEND=gloo timeout "${TIMING_TIMEOUT:-900}" python3 -m torch.distributed.run --standalone --nproc_per_node "$w" \
      launch/pretrain.py --plan "$(layout "$w")" --steps "${STEPS:-12}" --no-save --no-progress \
      --val-windows "$w" --out "$OUT/time$w" > "$OUT/time$w.log" 2>&1 || { tail -20 "$OUT/time$w.log"; exit 1; }
    python3 - "$OUT/time$w/history.json" "$w" <<'PY'
import json, statistics, sys
h = json.load(open(sys.argv[1]))
t = [r["step_s"] for r in h[3:]]
print(f"world {sys.argv[2]} (one GPU): median step {statistics.median(t):.3f} s over steps 4-{len(h)} "
      f"(min {min(t):.3f}), final loss {h[-1]['loss']:.4f}")
PY
  done
  exit 0
fi
common=(--steps 4 --no-progress --no-save --out "$OUT/run" --rows "${ROWS:-30}")
[ "${CPROFILE:-0}" = 1 ] && common+=(--cprofile)   # one more step, under cProfile (rank 0)
for w in ${WORLDS:-1 2}; do
  ARBD_CUDA_BACKEND=gloo python3 -m torch.distributed.run --standalone --nproc_per_node "$w" \
    bench/comm_profile.py --plan "$(layout "$w")" --val-windows "$w" --json "$OUT/sync$w.json" \
    "${common[@]}" 2>&1 | grep -v -i warn | tail -${TAIL:-90}
done
