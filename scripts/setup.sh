#!/usr/bin/env bash
# Idempotent environment set-up for arbd: creates .venv and installs the pinned stack.
# Used by the README, .ci/run and docker/Dockerfile, so all three install the same way.
# A second run only checks a stamp file and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ARBD_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
# Every pip call gets this constraints file: DeepSpeed asks for an unpinned torch, which would
# otherwise pull a CUDA build with several GB of nvidia packages.
CONSTRAINTS=scripts/constraints.txt
STAMP="$VENV/.arbd-setup-$(cat setup.cfg scripts/constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)"

if [ -f "$STAMP" ]; then
  echo "setup: $VENV is up to date ($STAMP)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -c "$CONSTRAINTS" --upgrade pip setuptools wheel
# ARBD_TORCH_INDEX_URL: where to find the CPU build of torch when the machine's pip does not
# already provide one (docker/Dockerfile sets it). Left empty, pip's own configuration decides.
TORCH_INDEX=()
[ -n "${ARBD_TORCH_INDEX_URL:-}" ] && TORCH_INDEX=(--index-url "$ARBD_TORCH_INDEX_URL")
$PIP install -c "$CONSTRAINTS" "${TORCH_INDEX[@]}" "torch==$TORCH_VERSION"
# DeepSpeed ships as an sdist: build it against the torch already installed, with no C++ ops.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 $PIP install -c "$CONSTRAINTS" --no-build-isolation "deepspeed==0.19.8" "torch==$TORCH_VERSION"
fi
$PIP install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" -e ".[test]"
touch "$STAMP"
echo "setup: done ($VENV)"
