#!/usr/bin/env bash
# One device call (session 13), issue 24 then issue 21: the gpu-marked KV-transfer tests;
# tcp between GPU pools against the same-run raw socket rate once per pinned staging config
# (STAGING, depth x MiB; --raw-cold adds raw senders that each send their own whole buffer);
# the pull alone and beside a decode step (bench/pull_beside_decode.py) at 4k tokens (on an
# H200 at 16k first); then on an H200 only (unless MIXED=0), in the time left before
# DEADLINE_S, issue 21's mixed step times. An H200 sweeps fewer staging configs.
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session13.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
h200=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && h200=1
if [ $h200 = 1 ]; then staging=${STAGING:-3x4,2x8}; pull_tokens="16384 4096"
else staging=${STAGING:-2x8,3x4,4x2,3x1,2x16}; pull_tokens=4096; fi
BENCH_ARGS="--gpu-tcp --tokens ${TCP_TOKENS:-4096,16384} --reps ${REPS:-3} --raw-cold
  --staging $staging" BENCH_TIMEOUT=${BENCH_TIMEOUT:-330} OUT="$OUT" \
  bash bench/gpu_kv_transfer.sh
eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>&1  # msgspec, zmq: pdserve's imports
[ "${PULLS:-1}" = 0 ] && pull_tokens=""
for tok in $pull_tokens; do
  echo "== $tok-token pulls beside a decode step (+$(( $(date +%s) - start )) s)"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${PULL_TIMEOUT:-150}" \
    python3 bench/pull_beside_decode.py --out "$OUT/pull$tok" --tokens "$tok" \
    --methods "${METHODS:-gather,bounded-8}" 2>&1 | tee "$OUT/pull$tok.log" | tail -8
done
left=$(( ${DEADLINE_S:-580} - ($(date +%s) - start) ))
if [ "${MIXED:-1}" != 0 ] && [ $h200 = 1 ] && [ "$left" -gt 60 ]; then
  echo "== mixed steps (H200, ${left} s left)"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$left" \
    python3 bench/mixed_steps.py --out "$OUT" 2>&1 | tee "$OUT/mixed.log" | tail -16
else
  echo "== mixed steps skipped (MIXED=0, not an H200, or ${left} s left)"
fi
echo "== done in $(( $(date +%s) - start )) s"
grep -E "^\| (raw|e2e) |staging:" "$OUT/bench.log" | tail -40
