#!/usr/bin/env bash
# One device call (session 17), in order of need, each step under its own time limit:
#   1. issue 24's bar, the pulls alone at 4k and 16k tokens (PULL_TOKENS; "" = skip): the
#      default cut and a few others, timed in interleaved rounds with the same-run copy;
#   2. issue 16: the skinny linear with K split over programs against the prologue kernel +
#      cuBLAS (bench/gemv_sweep.py; GEMV=0 skips; GEMV_ARGS);
#   3. its gpu-marked tests, compiled (SKIP_TESTS=1 skips);
#   4. bench/serving_gpu.py with the skinny path off, then up to each of SKINNY (rows; the
#      last run also prints the per-kernel profile; SERVING_ARGS).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session17.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
CONFIGS=${CONFIGS:-"tpp=8,stream=1;stream=1;tpp=4"}
# shellcheck disable=SC2086  # PULL_TOKENS: token counts, word-split
pulls_alone "${REPS:-15}" "${PULL_TIMEOUT:-90}" ${PULL_TOKENS-4096 16384}
if [ "${GEMV:-1}" != 0 ]; then
  echo "== 2. skinny linear sweep ($(el))"
  # shellcheck disable=SC2086  # GEMV_ARGS: arguments, word-split
  timeout "${GEMV_TIMEOUT:-260}" python3 bench/gemv_sweep.py --out "$OUT" \
    ${GEMV_ARGS:---budget-s 200} 2>&1 | tee "$OUT/gemv.log" | tail -10
fi
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  echo "== 3. skinny linear gpu tests ($(el))"
  timeout 150 python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu \
    --timeout 120 tests/kernels/test_gemv.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
fi
last=""
for rows in ${SKINNY-32}; do last=$rows; done
for rows in 0 ${SKINNY-32}; do
  echo "== 4. serving_gpu.py, skinny up to $rows rows ($(el))"
  mkdir -p "$OUT/skinny$rows"
  prof=--no-profile; lines=8
  [ "$rows" = "$last" ] && prof="" && lines=60
  # shellcheck disable=SC2086  # SERVING_ARGS: arguments, word-split
  timeout "${SERVING_TIMEOUT:-150}" python3 bench/serving_gpu.py --out "$OUT/skinny$rows" \
    --skinny-max-rows "$rows" ${SERVING_ARGS:---runs 1 --no-transformers} $prof 2>&1 \
    | tee "$OUT/skinny$rows.log" | tail -"$lines"
done
echo "== done in $(el)"
