#!/usr/bin/env bash
# One device run (issue 16): the decode GEMMs under cuBLAS and cuBLASLt, then the engine as it
# serves under each (bench/serving_gpu.py --blas), same machine, same call.
#   1. bench/blas_backends.py (Llama-3-8B GEMMs at 1/32/256 rows, both back ends);
#   2. bench/serving_gpu.py --blas cublas, then --blas cublaslt (SERVING_ARGS).
# Console output in $OUT/log.txt, JSON beside it.
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_blas_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/cublas" "$OUT/cublaslt"
start=$(date +%s)
LOG="$OUT/log.txt"
step() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - start )) s) $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
eval "$(bash scripts/gpu_wheels.sh install 2>/dev/null)" || { echo "wheels failed" | tee -a "$LOG"; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
step "1. GEMMs under cuBLAS and cuBLASLt"
timeout 150 python3 bench/blas_backends.py --out "$OUT" 2>&1 | tee -a "$LOG" | tail -18
for be in cublas cublaslt; do
  step "2. serving_gpu.py --blas $be"
  # shellcheck disable=SC2086  # SERVING_ARGS: arguments, word-split
  timeout 170 python3 bench/serving_gpu.py --blas "$be" --out "$OUT/$be" \
    ${SERVING_ARGS:---runs 1 --no-transformers --no-profile} 2>&1 | tee -a "$LOG" | tail -7
done
step "done"
