#!/usr/bin/env bash
# One device call (session 18, issue 16): a decode layer's four linears at one row chained with
# and without programmatic dependent launch (bench/pdl_chain.py), the skinny kernel's gpu tests
# (the PDL bit-equality test among them), then engine.step() decode (serving_gpu.py, batches
# $BATCHES, no prefill) with the linears through cuBLAS, through the skinny kernel up to $ROWS
# rows, and the same as programmatic dependents.
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session18b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
echo "== 1. pdl_chain.py ($(el))"
timeout 240 python3 bench/pdl_chain.py --out "$OUT" ${CHAIN_ARGS:---rows 1,4} 2>&1 \
  | tee "$OUT/pdl_chain.log" | tail -40
echo "== 2. gpu tests ($(el))"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests/kernels/test_gemv.py} \
  2>&1 | tee "$OUT/tests.log" | tail -8
[ "${SERVING:-1}" = 0 ] && { echo "== done in $(el)"; exit 0; }
BATCHES=${BATCHES:-1,4}
ROWS=${ROWS:-4}
serve() {  # serve NAME [serving_gpu args...]
  local name=$1; shift
  echo "== 3. serving_gpu.py, $name ($(el))"
  mkdir -p "$OUT/$name"
  timeout 150 python3 bench/serving_gpu.py --out "$OUT/$name" --batches "$BATCHES" --runs 3 \
    --no-transformers --no-profile --no-prefill "$@" 2>&1 | tee "$OUT/$name/log" | tail -3
}
serve cublas --skinny-max-rows 0
serve skinny --skinny-max-rows "$ROWS"
serve pdl --skinny-max-rows "$ROWS" --skinny-pdl
serve cublas2 --skinny-max-rows 0
echo "== done in $(el)"
