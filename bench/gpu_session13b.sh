#!/usr/bin/env bash
# Second device call (session 13): on an H200 first (unless MIXED=0) issue 21's mixed step
# times (bench/mixed_steps.py, MIXED_TIMEOUT); then issue 24: where pinned-staged tcp loses
# time (bench/tcp_staging_probe.py: plain sockets, torch copies vs driver-API copies), and
# bench/gpu_session13.sh's tests and staging sweep with the driver-API staging (no pulls).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session13b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/probe"
python3 -m pip install --no-deps --no-build-isolation -e . -q >/dev/null 2>&1
if [ "${MIXED:-1}" != 0 ] && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200
then
  echo "== mixed steps (H200)"
  ( eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>&1
    timeout "${MIXED_TIMEOUT:-220}" python3 bench/mixed_steps.py --out "$OUT" 2>&1 \
      | tee "$OUT/mixed.log" | tail -16 )
fi
echo "== staging probe"
timeout "${PROBE_TIMEOUT:-120}" python3 bench/tcp_staging_probe.py \
  --chunk-mib "${PROBE_CHUNKS:-1,8}" --modes raw,both --api torch,driver --out "$OUT/probe" \
  2>&1 | tail -10
PULLS=0 MIXED=0 STAGING=${STAGING:-3x1,3x2,2x8} BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} \
  bash bench/gpu_session13.sh
