#!/usr/bin/env bash
# One device call (session 17) that only runs on an H200 (the card issues 16 and 24 state
# their bars for; the tool may lend an H100 for it): on any other card it prints the card and
# stops before installing anything (ANY_CARD=1 runs it anyway). Steps, each under its limit:
#   1. issue 24: the pulls alone at 4k and 16k tokens, the cuts and the copy in interleaved
#      rounds (bench/pull_beside_decode.py --methods ",");
#   2. issue 24: a batch-32 decode step beside back-to-back 16k-token pulls (gather, bounded-8);
#   3. issue 16: bench/serving_gpu.py, median of 3 runs with the per-kernel profile
#      (SERVING_ARGS), and with BEFORE=<dir> the same from that tree first.
# BESIDE=0 skips step 2, SERVING=0 step 3 (a short call: the pulls alone only).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session17b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if [[ "$card" != *H200* ]] && [ "${ANY_CARD:-0}" = 0 ]; then
  echo "card: $card (not an H200): nothing run"; exit 0
fi
source bench/gpu_setup.sh
CONFIGS="tpp=8,stream=1;stream=1;tpp=4"
pulls_alone 15 90 4096 16384
if [ "${BESIDE:-1}" != 0 ]; then
  echo "== 2. decode step beside 16k-token pulls ($(el))"
  timeout 150 python3 bench/pull_beside_decode.py --out "$OUT/beside" --tokens 16384 \
    --methods gather,bounded-8 2>&1 | tee "$OUT/beside.log" | tail -5
fi
[ "${SERVING:-1}" = 0 ] && { echo "== done in $(el)"; exit 0; }
if [ -n "${BEFORE:-}" ]; then
  echo "== 3a. serving_gpu.py, before ($BEFORE) ($(el))"
  mkdir -p "$OUT/before"
  # shellcheck disable=SC2086  # SERVING_ARGS: arguments, word-split
  PYTHONPATH="$PWD/$BEFORE${PYTHONPATH:+:$PYTHONPATH}" timeout 200 \
    python3 "$BEFORE/bench/serving_gpu.py" --out "$OUT/before" \
    ${SERVING_ARGS:---runs 3 --no-transformers --no-profile} 2>&1 | tail -8
fi
echo "== 3b. serving_gpu.py, this tree ($(el))"
# shellcheck disable=SC2086
timeout 240 python3 bench/serving_gpu.py --out "$OUT" \
  ${SERVING_ARGS:---runs 3 --no-transformers} 2>&1 | tee "$OUT/serving.log" | tail -40
echo "== done in $(el)"
