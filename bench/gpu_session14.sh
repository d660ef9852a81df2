#!/usr/bin/env bash
# One device call (session 14), issue 24's pull alone: bench/pull_beside_decode.py at 4k
# and 16k tokens, then the gpu-marked cuda_ipc and block-copy tests (the racing-cancel tcp
# test among them). The pulls: today's full grid and the bounded default beside a decode step, and
# the full grid's other cuts (GatherConfig specs: tile, steps per program, warps, streaming
# cache hints, persistent grids) alone, each with its host / device split.
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session14.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader \
  | tee "$OUT/gpu.txt"
eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>"$OUT/wheels.log" || {
  echo "wheels failed"; tail -5 "$OUT/wheels.log"; exit 1; }
timeout 90 python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/pip.log" 2>&1 \
  || echo "pip install -e failed (pip.log)"
CONFIGS=${CONFIGS:-"stream=1;tpp=8,stream=1;tpp=2,stream=1;tile=16384,tpp=8,warps=4,stream=1;\
tile=65536,tpp=2,stream=1;waves=2,stream=1;waves=4,stream=1;waves=4;\
waves=8,tile=16384,warps=4,stream=1;waves=16,tile=8192,warps=4,stream=1"}
for tok in ${PULL_TOKENS:-4096 16384}; do
  echo "== $tok-token pulls (+$(( $(date +%s) - start )) s)"
  timeout "${PULL_TIMEOUT:-170}" python3 bench/pull_beside_decode.py --out "$OUT/pull$tok" \
    --tokens "$tok" --reps "${REPS:-5}" --methods "${METHODS:-gather,bounded-8}" \
    --alone-configs "$CONFIGS" 2>&1 | tee "$OUT/pull$tok.log" | tail -24
done
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  timeout 150 python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu \
    --timeout 90 tests/kv_transfer/test_cuda_ipc.py tests/kernels/test_block_copy.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -6
  echo "gpu tests: rc=${PIPESTATUS[0]} (+$(( $(date +%s) - start )) s)"
fi
echo "== done in $(( $(date +%s) - start )) s"
