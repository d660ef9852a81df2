#!/usr/bin/env bash
# A short bench/overload.py on GPU 0 (P and D on it) that keeps every log: the diagnosis run
# after bench/gpu_overload.sh's GPU part failed its capacity phase. Usage as gpu_overload.sh.
set -e; eval "$(bash scripts/gpu_wheels.sh install)"
set +e -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_overload_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PDSERVE_CACHE_DIR=/tmp/pdserve-cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
bench=$PWD/bench/overload.py
cd /tmp
timeout 200 python3 "$bench" --hang-after 30 --max-num-seqs 4 --cap-seconds 8 --seconds 10 \
  --out "$OUT/gpu" --serve-arg=--local-devices --serve-arg=0 --serve-arg=0 \
  --serve-arg=--kv-cache-memory-bytes --serve-arg=4294967296 >"$OUT/gpu.txt" 2>&1
echo "gpu rc=$?" >>"$OUT/gpu.txt"
for d in /tmp/pdserve-cluster-*; do cp "$d"/*.log "$OUT/gpu/" 2>/dev/null; done
tail -12 "$OUT/gpu.txt" | cut -c1-600
for f in "$OUT"/gpu/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | grep -iv "loading weights" | tail -15 | cut -c1-400; done
