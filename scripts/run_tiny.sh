#!/usr/bin/env bash
# Set up (idempotent) and run the main job: a short CPU training run of arb-tiny on the
# embedded corpus, printing the loss per step. Extra arguments go to the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m arbd.train.tiny "$@"
