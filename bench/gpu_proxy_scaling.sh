#!/usr/bin/env bash
# `pdserve serve --api-server-count N` on a host with free cores (issue 17): N proxy processes
# on one port should carry about N x one process's streamed tokens when one process is the
# bottleneck. bench/proxy_overhead.py's throughput phase (fake engines in --batch mode, 1 ms
# steps, so the proxy saturates first; raw-socket client processes) for each N in $COUNTS.
# This 2-core dev box cannot show it (clients, fakes and proxies share the cores); the lent GPU
# host has 16. No GPU is used.
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`):
#   bash bench/gpu_proxy_scaling.sh            # COUNTS="1 2 4", STREAMS=1024, CLIENT_PROCS=8
set -e; eval "$(bash scripts/gpu_wheels.sh install)"
set +e -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_proxy_scaling_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
export PDSERVE_CACHE_DIR=/tmp/pdserve-cache
{ nproc; uptime; } | tee "$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
bench=$PWD/bench/proxy_overhead.py
cd /tmp
for n in ${COUNTS:-1 2 4}; do
  timeout 300 python3 "$bench" --phases throughput --tput-itl-ms "${ITL_MS:-1}" \
    --streams "${STREAMS:-1024}" --client-procs "${CLIENT_PROCS:-8}" --api-server-count "$n" \
    --out "/tmp/proxy_scaling/n$n" >"$OUT/n$n.txt" 2>&1
  echo "N=$n rc=$?: $(grep -h '^throughput' "$OUT/n$n.txt")"
  cp "/tmp/proxy_scaling/n$n/summary.json" "$OUT/n$n.json" 2>/dev/null
done | tee "$OUT/summary.txt"
