#!/usr/bin/env bash
# Run arbd pretraining in the Docker image, with the data and checkpoints mounted from the host.
#
#   docker build -f docker/Dockerfile -t arbd .
#   ARBD_DATA=/data/arbd CHECKPOINT_DIR=$PWD/checkpoints ARBD_PLAN=shard_plans/node-8gpu.yaml \
#     ARBD_SEED=0 ARBD_STEPS=100000 bash docker/run.sh [extra launch/pretrain.py args]
#   bash docker/run.sh --dry-run        # print the docker command, run nothing
#
# Knobs (environment):
#   ARBD_IMAGE       image to run                                     [arbd]
#   ARBD_PLAN        shard plan inside the image                      [shard_plans/h100-arb-small.yaml]
#   ARBD_GPUS        GPUs on this host = ranks (deepspeed --num_gpus); 0: CPU, one rank  [all visible]
#   ARBD_STEPS       optimizer steps                                  [20]
#   ARBD_SEED        seed (model init and data order)                 [0]
#   ARBD_DATA        host file or folder of training bytes, mounted read-only at /data;
#                    empty: the built-in stdlib corpus                []
#   CHECKPOINT_DIR   host folder for checkpoints, mounted at /checkpoints   [./checkpoints]
#   ARBD_OUT         host folder for history.json, loss.png, monitor/, launch.json  [./runs/docker]
#   ARBD_SAVE_INTERVAL  save every N steps (and at the end)           [ARBD_STEPS]
#   ARBD_UID         uid:gid the container runs as (non-root)         [$(id -u):$(id -g)]
# NCCL_* variables set here are passed through (see launch/slurm/pretrain.sbatch for their meaning).
set -euo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
die() { echo "docker/run.sh: error: $*" >&2; exit 2; }

IMAGE=${ARBD_IMAGE:-arbd}
PLAN=${ARBD_PLAN:-shard_plans/h100-arb-small.yaml}
STEPS=${ARBD_STEPS:-20}
SEED=${ARBD_SEED:-0}
SAVE_INTERVAL=${ARBD_SAVE_INTERVAL:-$STEPS}
CKPT=${CHECKPOINT_DIR:-$PWD/checkpoints}
OUT=${ARBD_OUT:-$PWD/runs/docker}
USER_IDS=${ARBD_UID:-$(id -u):$(id -g)}
[ "${USER_IDS%%:*}" != "0" ] || die "refusing to run the container as root (ARBD_UID=$USER_IDS)"

if [ -n "${ARBD_GPUS:-}" ]; then GPUS=$ARBD_GPUS
elif command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L | wc -l)
else GPUS=0
fi

ARGS=(run --rm --user "$USER_IDS" --shm-size 16g --ipc host
      -v "$CKPT:/checkpoints" -v "$OUT:/runs" -e PYTHONUNBUFFERED=1)
DATA_ARGS=()
if [ -n "${ARBD_DATA:-}" ]; then
  [ -e "$ARBD_DATA" ] || die "data path $ARBD_DATA (ARBD_DATA) does not exist"
  ARGS+=(-v "$(cd "$(dirname "$ARBD_DATA")" && pwd)/$(basename "$ARBD_DATA"):/data:ro")
  DATA_ARGS=(--data /data)
fi
for v in $(compgen -e | grep '^NCCL_' || true); do ARGS+=(-e "$v"); done
TRAIN=(launch/pretrain.py --plan "$PLAN" --steps "$STEPS" --seed "$SEED" --out /runs
       --save-dir /checkpoints --save-interval "$SAVE_INTERVAL" --no-progress "${DATA_ARGS[@]}" "$@")
if [ "$GPUS" -gt 0 ]; then
  ARGS+=(--gpus all "$IMAGE" deepspeed --num_gpus "$GPUS" "${TRAIN[@]}")
else
  ARGS+=("$IMAGE" python "${TRAIN[@]}")
fi

if [ "$DRY" = 1 ]; then
  printf '%q ' docker "${ARGS[@]}"; echo
  exit 0
fi
command -v docker >/dev/null 2>&1 || die "docker is not installed on this host"
mkdir -p "$CKPT" "$OUT"
# What reproduces this run exactly: the image (by digest), the plan, the seed, the command.
DIGEST=$(docker image inspect "$IMAGE" --format '{{.Id}}') || die "image $IMAGE not found: docker build -f docker/Dockerfile -t $IMAGE ."
printf '{"image": "%s", "image_id": "%s", "plan": "%s", "seed": %s, "steps": %s, "gpus": %s}\n' \
  "$IMAGE" "$DIGEST" "$PLAN" "$SEED" "$STEPS" "$GPUS" > "$OUT/launch.json"
echo "docker/run.sh: image $IMAGE ($DIGEST), plan $PLAN, seed $SEED -> $OUT/launch.json"
exec docker "${ARGS[@]}"
