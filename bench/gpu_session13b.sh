#!/usr/bin/env bash
# Second device call (session 13), issue 24: where pinned-staged tcp loses time
# (bench/tcp_staging_probe.py: plain sockets, torch copies vs driver-API copies), then
# bench/gpu_session13.sh's tests and staging sweep with the driver-API staging, no pulls, no
# mixed steps. Usage (repo root, on the lent machine; carry [".whl"]):
#   bash bench/gpu_session13b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/probe"
python3 -m pip install --no-deps --no-build-isolation -e . -q >/dev/null 2>&1
timeout "${PROBE_TIMEOUT:-150}" python3 bench/tcp_staging_probe.py --chunk-mib "${PROBE_CHUNKS:-1,2,8}" \
  --modes raw,both --api torch,driver --out "$OUT/probe" 2>&1 | tail -12
PULLS=0 MIXED=0 STAGING=${STAGING:-3x1,4x2,3x4,2x8} bash bench/gpu_session13.sh
