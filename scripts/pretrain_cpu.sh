#!/usr/bin/env bash
# Set up (idempotent) and run the main job: DeepSpeed pretraining of arb-tiny on 2 CPU ranks
# (gloo) with the embedded corpus. Extra arguments go to launch/pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export PATH="$PWD/.venv/bin:$PATH"
exec deepspeed --num_gpus 2 launch/pretrain.py --plan shard_plans/cpu-2.yaml --steps 30 \
  --log-interval 1 --eval-interval 10 --out runs/pretrain-cpu2 "$@"
