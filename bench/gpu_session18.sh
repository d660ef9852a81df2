#!/usr/bin/env bash
# One device call (session 18, issue 16): does warming L2 with o_proj's weights beside the
# decode attention pay?
#   1. bench/l2_prefetch.py: per-layer units (o_proj, attention, the layer's GEMMs) with and
#      without the side-stream prefetch, variants bulk/load x programs, batches 1, 8, 32;
#   2. bench/serving_gpu.py decode steps (batches $BATCHES, median of 3 runs, no prefill):
#      prefetch off, then each of $PREFETCH (variant:programs, up to $ROWS rows), then off
#      again (drift check).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session18.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
BATCHES=${BATCHES:-1,8,32}
ROWS=${ROWS:-32}
PREFETCH=${PREFETCH:-bulk:16 load:32}
if [ "${MICRO:-1}" != 0 ]; then
  echo "== 1. l2_prefetch.py ($(el))"
  timeout 200 python3 bench/l2_prefetch.py --out "$OUT" ${MICRO_ARGS:-} 2>&1 \
    | tee "$OUT/l2_prefetch.log" | tail -30
fi
serve() {  # serve NAME [serving_gpu args...]
  local name=$1; shift
  echo "== 2. serving_gpu.py, $name ($(el))"
  mkdir -p "$OUT/$name"
  timeout 150 python3 bench/serving_gpu.py --out "$OUT/$name" --batches "$BATCHES" --runs 3 \
    --no-transformers --no-profile --no-prefill "$@" 2>&1 | tee "$OUT/$name/log" | tail -4
}
serve off --l2-prefetch-max-rows 0
for p in $PREFETCH; do serve "pf_${p/:/_}" --l2-prefetch-max-rows "$ROWS" --l2-prefetch "$p"; done
serve off2 --l2-prefetch-max-rows 0
echo "== done in $(el)"
