#!/usr/bin/env bash
# Second device call (session 12): the gpu-marked KV-transfer tests (bounded pulls included),
# tcp between GPU pools with the new default of 8 connections against the raw socket rate,
# then bench/pull_beside_decode.py over a finer range of bounded grids.
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session12b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
BENCH_ARGS="--gpu-tcp --reps ${REPS:-5}" BENCH_TIMEOUT=${BENCH_TIMEOUT:-120} OUT="$OUT" \
  bash bench/gpu_kv_transfer.sh
echo "== pulls beside a decode step (+$(( $(date +%s) - start )) s)"
eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>&1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${PULL_TIMEOUT:-200}" \
  python3 bench/pull_beside_decode.py --out "$OUT" \
  --methods "${METHODS:-gather,bounded-4,bounded-12,bounded-16,bounded-24}" 2>&1 \
  | tee "$OUT/pull.log" | tail -10
