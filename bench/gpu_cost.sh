#!/usr/bin/env bash
# Full-size GPU timing of the paper's recipe (bench/gpu_cost.py) on a bare GPU machine, in one command.
#
#   bench/gpu_cost.sh fetch            # here, with PyPI: the wheels a bare PyTorch image lacks, into .whl/
#   bench/gpu_cost.sh run [ARGS]       # there: install them to /tmp/site, time every stage (new stages stop
#                                      # after 420 s), write gpu_cost.json and gpu_cost.log to $OUT (or out/)
#   bench/gpu_cost.sh dry-run [ARGS]   # anywhere: the same script on the meta device (no GPU, a minute or two)
#
# Through the device tool: run(command="bash bench/gpu_cost.sh run", carry=[".whl"], timeout_s=540).
# ARGS go to gpu_cost.py (default --device cuda --batch 1,4 --iters 3 --budget-s 420).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUTDIR=${OUT:-out}; mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

case "${1:-}" in
  fetch)
    # the versions this project's environment runs; diffusers and open_clip are not in the GPU image
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 importlib_metadata==10.2.0
    ls .whl ;;
  run)
    shift
    if ! "$PY" -c "import diffusers, open_clip" 2>/dev/null; then
      [ -d .whl ] || { echo "gpu_cost.sh: diffusers/open_clip missing and no .whl/ (run 'bench/gpu_cost.sh fetch' here and carry .whl)" >&2; exit 2; }
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" bench/gpu_cost.py --device cuda --batch 1,4 --iters 3 --budget-s 420 --json "$OUTDIR/gpu_cost.json" "$@" \
      2>&1 | grep -v "should be kept in float32\|No pretrained weights" | tee "$OUTDIR/gpu_cost.log" ;;
  dry-run)
    shift
    "$PY" bench/gpu_cost.py --dry-run "$@" 2>&1 | grep -v "should be kept in float32\|No pretrained weights" ;;
  *)
    echo "usage: bench/gpu_cost.sh fetch | run [gpu_cost.py args] | dry-run" >&2; exit 2 ;;
esac
