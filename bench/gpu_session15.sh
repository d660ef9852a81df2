#!/usr/bin/env bash
# One device call (session 15): issue 24's pulls with the engine's default gather
# (DEFAULT_GATHER) at 4k and 16k tokens, beside a real decode step (batch 32) and alone,
# then a dry run of issue 25's two-GPU script's steps 1-2 on this GPU (STEPS_25, "" = none).
# Usage (repo root, on the lent machine; carry [".whl"]): bash bench/gpu_session15.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader \
  | tee "$OUT/gpu.txt"
eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>"$OUT/wheels.log" || {
  echo "wheels failed"; tail -5 "$OUT/wheels.log"; exit 1; }
timeout 90 python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/pip.log" 2>&1 \
  || echo "pip install -e failed (pip.log)"
python3 -c "from pdserve.kernels.block_copy import DEFAULT_GATHER as d; print('DEFAULT_GATHER', d)" \
  | tee "$OUT/default_gather.txt"
for tok in ${PULL_TOKENS:-4096 16384}; do
  echo "== $tok-token pulls (+$(( $(date +%s) - start )) s)"
  timeout "${PULL_TIMEOUT:-170}" python3 bench/pull_beside_decode.py --out "$OUT/pull$tok" \
    --tokens "$tok" --reps "${REPS:-7}" --methods "${METHODS:-gather,bounded-8}" \
    --alone-configs "${CONFIGS:-}" 2>&1 | tee "$OUT/pull$tok.log" | tail -8
done
if [ -n "${STEPS_25-1 2}" ]; then
  echo "== issue 25 dry run, steps ${STEPS_25-1 2} (+$(( $(date +%s) - start )) s)"
  OUT="$OUT/two_gpu" STEPS="${STEPS_25-1 2}" timeout "${DRY_TIMEOUT:-240}" \
    bash bench/gpu_two_gpu_pd.sh 2>&1 | tail -30
fi
echo "== done in $(( $(date +%s) - start )) s"
