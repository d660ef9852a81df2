#!/usr/bin/env bash
# One device call (session 16), in order of need, each step under its own time limit:
#   1. issue 24's bar, the pulls alone (no engine) at 4k and 16k tokens on an H200: the default
#      gather (DEFAULT_GATHER) and a few GatherConfig cuts beside it, each against the same-run
#      copy (CONFIGS; PULL_TOKENS);
#   2. a batch-32 decode step beside back-to-back 16k-token pulls, full grid and bounded-8
#      (BESIDE_TOKENS; "" = skip);
#   3. issue 16: the gpu-marked decode attention tests (compiled: bits equal at any spread;
#      TESTS: other pytest arguments);
#   4. the decode attention sweep (SWEEP_ARGS; SWEEP=0 skips) on this GPU;
#   5. with BEFORE=<dir> (a `git archive` of an earlier commit in the tree) and/or SERVING=1:
#      bench/serving_gpu.py from that tree, then from this one (SERVING_ARGS).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session16.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
# DEFAULT_GATHER (tpp=8, streaming) named first: an empty spec is no config
CONFIGS=${CONFIGS:-"tpp=8,stream=1;tpp=4;stream=1;tile=65536,tpp=2,stream=1"}
# shellcheck disable=SC2086  # PULL_TOKENS: token counts, word-split
pulls_alone "${REPS:-7}" "${PULL_TIMEOUT:-90}" ${PULL_TOKENS:-4096 16384}
for tok in ${BESIDE_TOKENS-16384}; do
  echo "== 2. decode step beside $tok-token pulls ($(el))"
  timeout "${BESIDE_TIMEOUT:-150}" python3 bench/pull_beside_decode.py --out "$OUT/beside$tok" \
    --tokens "$tok" --methods gather,bounded-8 2>&1 | tee "$OUT/beside$tok.log" | tail -10
done
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  echo "== 3. decode attention gpu tests ($(el))"
  # shellcheck disable=SC2086  # TESTS: pytest arguments, word-split
  timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -p no:cacheprovider --import-mode=append \
    -q -rfE -m gpu --timeout 120 ${TESTS:-tests/kernels/test_attention.py -k decode} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -6
fi
if [ "${SWEEP:-1}" != 0 ]; then
  echo "== 4. decode attention sweep ($(el))"
  # shellcheck disable=SC2086  # SWEEP_ARGS: arguments, word-split
  timeout "${SWEEP_TIMEOUT:-200}" python3 bench/decode_attention_sweep.py --out "$OUT" \
    ${SWEEP_ARGS:---splits 32,64,128,256,512 --block-ns 32,64,128 --warps 4,8 --stages 2,3 \
    --spreads 1,2,4,8,16 --budget-s 150} 2>&1 | tee "$OUT/sweep.log" | tail -16
fi
if [ -n "${BEFORE:-}" ]; then
  echo "== 5a. serving_gpu.py, before ($BEFORE) ($(el))"
  mkdir -p "$OUT/before"
  # shellcheck disable=SC2086  # SERVING_ARGS: arguments, word-split
  PYTHONPATH="$PWD/$BEFORE${PYTHONPATH:+:$PYTHONPATH}" timeout "${SERVING_TIMEOUT:-150}" \
    python3 "$BEFORE/bench/serving_gpu.py" --out "$OUT/before" \
    ${SERVING_ARGS:---runs 1 --no-transformers --no-profile} 2>&1 | tail -8
fi
if [ -n "${BEFORE:-}" ] || [ "${SERVING:-0}" != 0 ]; then
  echo "== 5b. serving_gpu.py, this tree ($(el))"
  # shellcheck disable=SC2086
  timeout "${SERVING_TIMEOUT:-150}" python3 bench/serving_gpu.py --out "$OUT" \
    ${SERVING_ARGS:---runs 1 --no-transformers --no-profile} 2>&1 | tail -8
fi
echo "== done in $(el)"
