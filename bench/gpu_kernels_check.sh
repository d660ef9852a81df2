#!/usr/bin/env bash
# One device call: the gpu-marked kernel tests (compiled Triton vs the torch references), then
# bench/kernel_speed.py. Logs and results go under $OUT as they are made; a short table prints last.
# Usage (repo root, on a CUDA machine): [SKIP_TESTS=1] bash bench/gpu_kernels_check.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

# The pdserve.* namespace maps top-level folders (pyproject package-dir): install editable;
# where that fails, a symlink shim gives the same namespace without installing anything.
if python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/pip.log" 2>&1 \
    && (cd /tmp && python3 -c "import pdserve.kernels.attention") 2>>"$OUT/pip.log"; then
  echo "pdserve: editable install"
else
  echo "pdserve: editable install failed (see pip.log); using a namespace shim"
  shim=/tmp/pdserve_shim/pdserve
  mkdir -p "$shim"
  for f in pdserve/*; do ln -sfn "$PWD/$f" "$shim/"; done
  for d in common engine kernels kv_transfer service proxy prefill_worker decode_worker; do
    ln -sfn "$PWD/$d" "$shim/$d"
  done
  export PYTHONPATH=/tmp/pdserve_shim:$PWD
fi

if [ -z "${SKIP_TESTS:-}" ]; then
start=$(date +%s)
xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n 8"  # compile in 8 processes
python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu $xdist \
  tests/kernels/test_attention.py tests/kernels/test_elementwise.py tests/kernels/test_block_copy.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
fi

python3 bench/kernel_speed.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^|"
echo
grep "^|" "$OUT/bench.log"
