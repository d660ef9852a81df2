#!/usr/bin/env bash
# One device run for the engine on GPU: wheels, install, gpu-marked engine/sampling/kernel
# tests, then bench/serving_gpu.py (Llama-3-8B shapes). Logs and JSON under $OUT.
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
eval "$(bash scripts/gpu_wheels.sh install)"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import pdserve.engine, pdserve.kernels.sampling; print('pdserve imports ok')"
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -p no:cacheprovider -q -m gpu tests/engine tests/kernels_sampling \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || true
fi
python3 bench/serving_gpu.py --out "$OUT" 2>&1 | tee "$OUT/serving_gpu.log" | tail -20
