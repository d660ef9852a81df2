#!/usr/bin/env bash
# One device run for the engine on GPU: wheels, install, gpu-marked tests (TESTS, default the
# engine, sampling and kernel folders), then bench/serving_gpu.py (Llama-3-8B shapes). With
# BEFORE=<dir> (a checkout of an earlier commit inside the tree, e.g. `git archive <commit> |
# tar -x -C before_tree`), serving_gpu.py runs from it first (PYTHONPATH=<dir>), then from
# this tree: a before/after pair on the same machine. Logs and JSON under $OUT.
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`):
#   bash bench/gpu_engine_check.sh
#   TESTS="tests/engine/test_bf16_numerics.py" BEFORE=before_tree \
#     BEFORE_ARGS="--runs 2 --no-transformers --no-profile" SERVING_ARGS="--runs 2" \
#     bash bench/gpu_engine_check.sh
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
eval "$(bash scripts/gpu_wheels.sh install)"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import pdserve.engine, pdserve.kernels.sampling; print('pdserve imports ok')"
if [ -z "${SKIP_TESTS:-}" ]; then
  # shellcheck disable=SC2086  # TESTS: paths, word-split
  timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -p no:cacheprovider --import-mode=append \
      -q -s -rfE -m gpu --timeout 300 ${TESTS:-tests/engine tests/kernels_sampling} \
      2>&1 | tee "$OUT/gpu_tests.log" | grep -E "bf16 relative|passed|failed|FAILED|Error" || true
fi
# shellcheck disable=SC2086  # SERVING_ARGS, BEFORE_ARGS: serving_gpu.py arguments, word-split
if [ -n "${BEFORE:-}" ]; then
  mkdir -p "$OUT/before"
  PYTHONPATH="$PWD/$BEFORE${PYTHONPATH:+:$PYTHONPATH}" python3 bench/serving_gpu.py --out "$OUT/before" ${BEFORE_ARGS:-} \
    2>&1 | tee "$OUT/serving_gpu_before.log" | tail -6
fi
# shellcheck disable=SC2086
python3 bench/serving_gpu.py --out "$OUT" ${SERVING_ARGS:-} 2>&1 | tee "$OUT/serving_gpu.log" | tail -16
