#!/usr/bin/env bash
# One device call (session 12): issue 24's tcp between GPU pools against the same-run raw
# socket rate (after the gpu-marked KV-transfer tests: bench/gpu_kv_transfer.sh); issue 24's
# pull methods beside a real decode step (bench/pull_beside_decode.py, METHODS); then, on an
# H200 only (and unless MIXED=0) in the time left before DEADLINE_S, issue 21's mixed step
# times (bench/mixed_steps.py: the H200 fit has none).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session12.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
BENCH_ARGS="--gpu-tcp --reps ${REPS:-5}" BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} OUT="$OUT" \
  bash bench/gpu_kv_transfer.sh
echo "== pulls beside a decode step (+$(( $(date +%s) - start )) s)"
eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>&1  # msgspec, zmq: pdserve's imports
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${PULL_TIMEOUT:-200}" \
  python3 bench/pull_beside_decode.py --out "$OUT" \
  --methods "${METHODS:-gather,gather+prio,bounded-8,bounded-16,bounded-32,memcpy}" 2>&1 \
  | tee "$OUT/pull.log" | tail -12
left=$(( ${DEADLINE_S:-570} - ($(date +%s) - start) ))
if [ "${MIXED:-1}" != 0 ] && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 \
    && [ "$left" -gt 60 ]; then
  echo "== mixed steps (H200, ${left} s left)"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$left" \
    python3 bench/mixed_steps.py --out "$OUT" 2>&1 | tee "$OUT/mixed.log" | tail -16
else
  echo "== mixed steps skipped (MIXED=0, not an H200, or ${left} s left)"
fi
