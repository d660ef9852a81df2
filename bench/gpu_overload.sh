#!/usr/bin/env bash
# bench/overload.py on a lent H200 host (issue 13): first with CPU workers on its 16 cores
# (--kv-cache-memory-bytes given: on a GPU host the CPU default sizes the pool to 0 tokens)
# (the same cluster as on the 2-core dev VM, without four processes sharing two cores), then
# with P and D on GPU 0 (KV over cuda_ipc). Logs and JSON under $OUT; the tables print last.
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`)
set -e; eval "$(bash scripts/gpu_wheels.sh install)"
set +e -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_overload_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PDSERVE_CACHE_DIR=/tmp/pdserve-cache
nproc | tee "$OUT/machine.txt"; nvidia-smi --query-gpu=name --format=csv,noheader >>"$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
bench=$PWD/bench/overload.py
cd /tmp  # run as a user would, outside the checkout
timeout 240 python3 "$bench" --hang-after 60 --out "$OUT/cpu" --serve-arg=--device \
  --serve-arg=cpu --serve-arg=--kv-cache-memory-bytes --serve-arg=1073741824 >"$OUT/cpu.txt" 2>&1; echo "cpu rc=$?" >>"$OUT/cpu.txt"
# --max-num-seqs 4: a capacity one Python client can offer 4x of (at 16 sequences the GPU
# cluster takes ~68 req/s, and 272 streams/s saturate the client, which then measures itself)
timeout 300 python3 "$bench" --hang-after 60 --max-num-seqs 4 --out "$OUT/gpu" --serve-arg=--local-devices \
  --serve-arg=0 --serve-arg=0 --serve-arg=--kv-cache-memory-bytes --serve-arg=4294967296 \
  >"$OUT/gpu.txt" 2>&1; echo "gpu rc=$?" >>"$OUT/gpu.txt"
# the local clusters' worker logs (pdserve serve puts them in /tmp/pdserve-cluster-*)
for d in /tmp/pdserve-cluster-*; do cp "$d"/*.log "$OUT/" 2>/dev/null; done
for f in cpu gpu; do echo "== $f workers"; tail -25 "$OUT/$f.txt" | cut -c1-400; done
