#!/usr/bin/env bash
# Issue 25 in one device call: the P -> D handoff and bounded pulls across two GPUs of one
# host. JSON under $OUT as it goes; bench/two_gpu_report.py's table (each Must-show bar beside
# its figure) prints last.
#   1. the cuda_ipc gather through the IPC mapping vs the same-run copy GPU0 -> GPU1 at
#      1k / 4k / 16k tokens (bench/kv_transfer.py --kernel-only; the same GPU too);
#   2. a real decode step (batch 32, Llama-3-8B shapes, dummy bf16) on GPU 1 alone and beside
#      back-to-back 16k-token pulls from a pool on GPU 0 (bench/pull_beside_decode.py
#      --src-device cuda:0 --device cuda:1): the full grid and the bounded grid D uses busy;
#   3. the handoff workload (4,000-token prompts, 64 output tokens, Poisson 2 req/s):
#      P on GPU 0 + D on GPU 1 vs two both-role workers, one per GPU (bench/handoff.py
#      --mode gpu --gpu 0,1).
# On a one-GPU machine every step runs with P and D on GPU 0 (a dry run of the script; the
# report marks those rows "dry run").
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`):
#   bash bench/gpu_two_gpu_pd.sh                          # the definition (200 requests x 3 runs)
#   NUM_REQUESTS=60 RUNS=2 bash bench/gpu_two_gpu_pd.sh   # fits one 10-minute call
#   STEPS="1 2" ...                                       # a subset of the steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/two_gpu_out}; mkdir -p "$OUT"
source bench/gpu_setup.sh
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then P=0 D=1; else P=0 D=0; echo "one GPU: a dry run with P and D on GPU 0"; fi
STEPS=${STEPS:-"1 2 3"}

if [[ " $STEPS " == *" 1 "* ]]; then
  echo "== 1. gather vs copy ($(el))"
  timeout "${KERNEL_TIMEOUT:-150}" python3 bench/kv_transfer.py --kernel-only \
    --tokens 1024,4096,16384 --out "$OUT/kernels" >"$OUT/kernels.log" 2>&1
  echo "rc=$?"; tail -4 "$OUT/kernels.log"
fi
if [[ " $STEPS " == *" 2 "* ]]; then
  echo "== 2. decode step beside cross-GPU pulls ($(el))"
  timeout "${PULL_TIMEOUT:-200}" python3 bench/pull_beside_decode.py --out "$OUT/pull16k" \
    --src-device "cuda:$P" --device "cuda:$D" --tokens 16384 --reps "${REPS:-5}" \
    --methods "${METHODS:-gather,bounded-8}" >"$OUT/pull16k.log" 2>&1
  echo "rc=$?"; tail -5 "$OUT/pull16k.log"
fi
if [[ " $STEPS " == *" 3 "* ]]; then
  echo "== 3. handoff: P on GPU $P + D on GPU $D vs both-role workers ($(el))"
  (cd /tmp && timeout "${HANDOFF_TIMEOUT:-3000}" python3 "$OLDPWD/bench/handoff.py" --mode gpu \
    --gpu "$P,$D" --num-requests "${NUM_REQUESTS:-200}" --runs "${RUNS:-3}" \
    --out "$OUT/handoff.json" --log-dir "$OUT/handoff_logs") >"$OUT/handoff.log" 2>&1
  echo "rc=$?"; tail -6 "$OUT/handoff.log"
  tar czf "$OUT/handoff_logs.tgz" -C "$OUT" handoff_logs 2>/dev/null && rm -rf "$OUT/handoff_logs"
fi
echo "== done in $(el)"
python3 bench/two_gpu_report.py "$OUT"
