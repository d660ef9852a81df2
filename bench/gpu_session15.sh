#!/usr/bin/env bash
# One device call (session 15), in order of need, each step under its own time limit:
#   1. issue 24's pulls alone (no engine) at 4k and 16k tokens: the default gather and its
#      GatherConfig cuts (CONFIGS), each against the same-run copy, with its host/device split;
#   2. the gpu-marked cuda_ipc and block-copy tests (compiled kernels; the tcp racing-cancel
#      test among them);
#   3. a dry run of issue 25's two-GPU script, steps 1-2 (STEPS_25; "" = skip) on this GPU.
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session15.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
CONFIGS=${CONFIGS:-"stream=1;tpp=8,stream=1;tpp=2,stream=1;tile=16384,tpp=8,warps=4,stream=1;\
tile=65536,tpp=2,stream=1;waves=2,stream=1;waves=4,stream=1;waves=4;\
waves=8,tile=16384,warps=4,stream=1;waves=16,tile=8192,warps=4,stream=1;tpp=16,stream=1;\
tile=65536,tpp=4,stream=1"}
for tok in ${PULL_TOKENS:-4096 16384}; do
  echo "== 1. $tok-token pulls alone ($(el))"
  # the default first (an empty spec: DEFAULT_GATHER), then each cut
  timeout "${PULL_TIMEOUT:-110}" python3 bench/pull_beside_decode.py --out "$OUT/pull$tok" \
    --tokens "$tok" --reps "${REPS:-7}" --methods "," --alone-configs "tpp=4;$CONFIGS" 2>&1 \
    | tee "$OUT/pull$tok.log" | tail -18
done
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  echo "== 2. gpu tests ($(el))"
  timeout 170 python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu \
    --timeout 90 tests/kv_transfer/test_cuda_ipc.py tests/kernels/test_block_copy.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -6
fi
if [ -n "${STEPS_25-1 2}" ]; then
  echo "== 3. issue 25 dry run, steps ${STEPS_25-1 2} ($(el))"
  OUT="$OUT/two_gpu" STEPS="${STEPS_25-1 2}" KERNEL_TIMEOUT=100 PULL_TIMEOUT=150 \
    timeout "${DRY_TIMEOUT:-260}" bash bench/gpu_two_gpu_pd.sh 2>&1 | tail -24
fi
echo "== done in $(el)"
