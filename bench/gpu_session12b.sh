#!/usr/bin/env bash
# Second device call (session 12): bench/gpu_session12.sh over a finer range of bounded grids,
# without the mixed steps. Usage (repo root, on the lent machine; carry [".whl"]):
#   bash bench/gpu_session12b.sh
METHODS=${METHODS:-gather,bounded-4,bounded-12,bounded-16,bounded-24} MIXED=0 BENCH_TIMEOUT=120 \
  exec bash "$(dirname "$0")/gpu_session12.sh"
