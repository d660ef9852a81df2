#!/usr/bin/env bash
# bench/handoff.py on one GPU: the P -> D handoff's cost (token-2 gap - ITL) through
# `pdserve serve`, Llama-3-8B shapes with dummy bf16 weights, 4,000-token prompts, 64 output
# tokens, Poisson 2 req/s: a local 1 P + 1 D on GPU 0 (KV over cuda_ipc) vs one both-role
# worker on GPU 0. Two steps:
#   1. cold start: the first P/D launch with a fresh, empty TRITON_CACHE_DIR (mktemp -d) and no
#      warm-up request: launch -> ready ("ready_s") and the first request's TTFT
#      ("first_ttft_ms"), COLD_REQUESTS requests (default 10);
#   2. the measurement (`--mode $MODE`, default gpu: P/D, then both-role; gpu-all adds P/D with
#      --mps off), Triton cache now warm. P/D runs under the private MPS daemon that
#      `pdserve serve --mps auto` starts for two workers on one GPU.
# JSON and logs under $OUT (cold.json, handoff_gpu.json, logs.tgz); the tables print last.
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`):
#   bash bench/gpu_handoff.sh                           # the definition: 200 requests x 3 runs
#   NUM_REQUESTS=60 RUNS=2 bash bench/gpu_handoff.sh    # fits one 10-minute device call
#   DECODE_PERCENTS="50" ...    # and P/D with D limited to 50% of the SMs (--mps-decode-percent)
#   BENCH_ARGS="--serve-arg=--prefill-first" ...   # step 2's P/D with D holding for P's prefills
# Time: each run is NUM_REQUESTS / 2 s of arrivals, twice (P/D and both-role), plus each
# cluster's start (weights are dummy: mostly CUDA graph capture and Triton compiles) and
# 10 s of idle-CPU measurement per configuration.
set -e; eval "$(bash scripts/gpu_wheels.sh install)"
set +e -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_handoff_out}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PDSERVE_CACHE_DIR=/tmp/pdserve-cache
{ nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
  | tee "$OUT/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
bench=$PWD/bench/handoff.py
NUM_REQUESTS=${NUM_REQUESTS:-200}
RUNS=${RUNS:-3}
COLD_REQUESTS=${COLD_REQUESTS:-10}
cd /tmp  # run as a user would, outside the checkout

# 1. cold start: an empty Triton cache for the first P/D launch; no warm-up request
# (SKIP_COLD=1: skip it; step 2 then uses the default Triton cache, ~/.triton)
if [ -z "${SKIP_COLD:-}" ]; then
export TRITON_CACHE_DIR; TRITON_CACHE_DIR=$(mktemp -d)
echo "cold start: TRITON_CACHE_DIR=$TRITON_CACHE_DIR (empty: $(ls -A "$TRITON_CACHE_DIR" | wc -l) entries)" \
  | tee "$OUT/cold.txt"
timeout 900 python3 "$bench" --mode gpu-pd --warmup 0 --num-requests "$COLD_REQUESTS" --runs 1 \
  --out "$OUT/cold.json" --log-dir "$OUT/logs/cold" >>"$OUT/cold.txt" 2>&1
echo "cold rc=$?" >>"$OUT/cold.txt"
# what compiled when: each kernel the Triton cache holds, by time (a compile after the
# workers' "warm-up done" log line is one a live request paid for)
find "$TRITON_CACHE_DIR" -type f -name '*.json' ! -name '__grp__*' -printf '%TT %f\n' \
  | sort >"$OUT/cold_cache.txt"
grep -h "warm-up done\|ready:" "$OUT"/logs/cold/gpu-pd/*.log >>"$OUT/cold_cache.txt" 2>/dev/null
fi

if [ -n "${COLD_ONLY:-}" ]; then cat "$OUT/cold_cache.txt"; tail -n 4 "$OUT/cold.txt"; exit 0; fi
# 2. the measurement, P/D then both-role, with the Triton cache step 1 filled
# shellcheck disable=SC2086  # BENCH_ARGS: extra bench/handoff.py arguments, word-split
timeout 3600 python3 "$bench" --mode "${MODE:-gpu}" --num-requests "$NUM_REQUESTS" --runs "$RUNS" ${BENCH_ARGS:-} \
  --out "$OUT/handoff_gpu.json" --log-dir "$OUT/logs/gpu" >"$OUT/gpu.txt" 2>&1
echo "gpu rc=$?" >>"$OUT/gpu.txt"

# 3. (DECODE_PERCENTS="50 30") P/D once per value with D's kernels limited to that share of
# the SMs under the cluster's MPS daemon (pdserve serve --mps-decode-percent), NUM_REQUESTS
# requests, 1 run each
for pct in ${DECODE_PERCENTS:-}; do
  timeout 420 python3 "$bench" --mode gpu-pd --num-requests "$NUM_REQUESTS" --runs 1 \
    --serve-arg=--mps-decode-percent --serve-arg="$pct" \
    --out "$OUT/pd_decode$pct.json" --log-dir "$OUT/logs/pd_decode$pct" >"$OUT/pd_decode$pct.txt" 2>&1
  echo "decode-percent $pct rc=$?" >>"$OUT/pd_decode$pct.txt"
done

cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
[ -z "${SKIP_COLD:-}" ] && python3 - "$OUT/cold.json" <<'PY'
import json, sys
try:
    m = json.load(open(sys.argv[1]))["modes"]["gpu-pd"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"cold start: no result ({e}); see cold.txt")
runs = m.get("runs") or [{}]
ready, first = m.get("ready_s"), runs[0].get("first_ttft_ms")
print(f"cold start (empty Triton cache), 1 P + 1 D on one GPU: launch -> ready "
      f"{'-' if ready is None else f'{ready:.1f}'} s, first request's TTFT "
      f"{'-' if first is None else f'{first:.0f}'} ms{'; error: ' + m['error'] if 'error' in m else ''}")
PY
[ -f "$OUT/cold.txt" ] && tail -n 30 "$OUT/cold.txt" | grep -E "^\| |failed|error"
tail -n 20 "$OUT/gpu.txt"
for f in "$OUT"/pd_decode*.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f" .txt):"; tail -n 3 "$f"; }
done
