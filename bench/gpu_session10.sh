#!/usr/bin/env bash
# One device call (session 10): on an H200, engine.step() decode before (BEFORE tree) and
# after the asynchronous steps (issue 16's platform); then, in the time left before
# DEADLINE_S, bench/kv_transfer.py (issue 24: the GPU sections and the CPU ones on this host).
# Usage (repo root; carry [".whl", "before16"]): DEADLINE_S=400 bash bench/gpu_session10.sh
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( start + ${DEADLINE_S:-400} - $(date +%s) )); }
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$name"
eval "$(bash scripts/gpu_wheels.sh install 2>/dev/null)" || { echo "wheels failed"; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
if [[ "$name" == *H200* && -n "${BEFORE:-}" ]]; then
  mkdir -p "$OUT/before"
  PYTHONPATH="$PWD/$BEFORE:$PYTHONPATH" timeout 150 python3 "$BEFORE/bench/serving_gpu.py" \
    --out "$OUT/before" --runs 1 --no-transformers --no-profile 2>&1 | tail -6
  timeout 150 python3 bench/serving_gpu.py --out "$OUT" --runs 1 --no-transformers \
    --no-profile 2>&1 | tail -6
fi
l=$(left)
if [ "$l" -gt 60 ]; then
  echo "== kv_transfer.py ($l s)"
  timeout "$l" python3 bench/kv_transfer.py --out "$OUT/kv" --reps 5 2>&1 | tail -30
fi
