# Sourced by the device scripts (bench/train_step_gpu.sh, train_step_batch.sh, ab_trees.sh,
# run_multi_gpu.sh, sync_sites.sh) from the repo root: unbuffered Python with the checkout first
# on its path, and DeepSpeed, which the device image lacks, installed from the wheels in .whl/ds
# (to /tmp/site, its launcher on PATH) when it is not importable.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl/ds ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/ds/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"
fi
