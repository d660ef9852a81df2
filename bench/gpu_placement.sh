#!/usr/bin/env bash
# Issue 26 on one multi-GPU host: goodput of adaptive placement vs fixed layouts on real
# engines (Llama-3-8B shapes, dummy bf16 weights, one worker per GPU), `pdserve plan`'s
# prediction beside every point, goodput-vs-rate SVGs per SLO. bench/placement_goodput.py
# --gpus does the work; JSON per layout (summary.json) under $OUT as each finishes, the
# tables print last.
#   2 GPUs: 1p1d, 2both-256 / 2both-512 / 2both-1024 (collocated, chunk tuned: the best of
#           the three), flex-2048m512 (--placement slo over two both-role workers);
#   4 GPUs: 1p3d, 2p2d, 3p1d, 4both-256 / 4both-512, 4flex-2048m512.
# Rates: 0.2 to 1.2 x the knee (the rate where the best fixed layout last keeps >= 90% of
# requests within the strict SLO); the default RATES are 0.2..1.2 x the knee the simulator
# puts at ~60 req/s for two H200s (bench/placement_seeds.py, session 14) and twice that for
# four; pin the knee on the machine first with a quick pass (WINDOW=20) and set RATES.
# The whole definition (6 rates x 60 s x 5 layouts, plus each layout's start) is ~40 minutes:
# split it over calls with LAYOUTS (each call's layouts append to $OUT).
# On a one-GPU machine: a dry run, two workers sharing GPU 0 (GPUS=0,0, 8 GiB of KV each).
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`):
#   bash bench/gpu_placement.sh
#   LAYOUTS="1p1d flex-2048m512" RATES="12 36 60" WINDOW=60 bash bench/gpu_placement.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/placement_gpu_out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
KV=${KV_BYTES:-$((16 << 30))}
case "$ngpu" in
  1) GPUS=${GPUS:-0,0}; KV=${KV_BYTES:-$((8 << 30))}; echo "one GPU: a dry run, two workers on GPU 0"
     DEF_LAYOUTS="1p1d 2both-512 flex-2048m512"; DEF_RATES="2 4" ;;
  2|3) GPUS=${GPUS:-0,1}
     DEF_LAYOUTS="1p1d 2both-256 2both-512 2both-1024 flex-2048m512"; DEF_RATES="12 24 36 48 60 72" ;;
  *) GPUS=${GPUS:-0,1,2,3}
     DEF_LAYOUTS="1p3d 2p2d 3p1d 4both-256 4both-512 4flex-2048m512"
     DEF_RATES="24 48 72 96 120 144" ;;
esac
MODEL=${PLAN_MODEL:-$(python3 -c "import torch; print('h100-llama3-8b' if 'H100' in torch.cuda.get_device_name(0) else 'h200-llama3-8b')")}
# shellcheck disable=SC2086  # LAYOUTS and RATES are word lists
timeout "${TIMEOUT:-3300}" python3 bench/placement_goodput.py --gpus "$GPUS" \
  --gpu-kv-bytes "$KV" --layouts ${LAYOUTS:-$DEF_LAYOUTS} --rates ${RATES:-$DEF_RATES} \
  --window "${WINDOW:-60}" --plan --plan-model "$MODEL" --out "$OUT" 2>&1 | tee "$OUT/placement.log" | tail -40
echo "rc=${PIPESTATUS[0]}"
