#!/usr/bin/env bash
# One device run for issue 16 (decode attention configs, fused rotary + KV write) and issue 21
# (mixed step times): wheels, install, then, each under `timeout` and a deadline (DEADLINE_S
# after the start, default 520 s) so one hang cannot eat the call:
#   1. the gpu-marked tests of the fused rotary + KV write and of decode attention (a quick
#      check that they compile and are right; T1: another pytest -k expression);
#   2. bench/decode_attention_sweep.py (SWEEP=0 skips; SWEEP_ARGS);
#   2b. with GEMV=1: bench/gemv_sweep.py (GEMV_ARGS);
#   3. bench/mixed_steps.py (MIXED=0 skips);
#   4. bench/serving_gpu.py from BEFORE=<dir> (a `git archive` of an earlier commit inside the
#      tree, PYTHONPATH=<dir>), then from this tree (SERVING_ARGS, BEFORE_ARGS);
#   4c. with PREFILL_SDPA=1: bench/kernel_speed.py --sections prefill (vs torch's SDPA backends);
#   5. the gpu-marked tests of tests/kernels, tests/engine/test_gpu_engine.py and
#      tests/engine/test_bf16_numerics.py (TESTS: other paths), in what time is left.
# Console output in $OUT/log.txt, JSON beside it (at most 8 files come back).
# Usage (repo root, on the lent machine; carry [".whl"]):
#   BEFORE=before16 bash bench/gpu_issue16_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-520}))
LOG="$OUT/log.txt"
left() {  # seconds to give the next step: min(want, time left before the deadline)
  local l=$((deadline - $(date +%s)))
  [ "$l" -lt 1 ] && l=1
  [ "$l" -lt "$1" ] && echo "$l" || echo "$1"
}
step() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - start )) s) $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
eval "$(bash scripts/gpu_wheels.sh install 2>/dev/null)" || { echo "wheels failed" | tee -a "$LOG"; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  2>&1 | tee -a "$LOG"
PYTEST=(python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu)

step "1. fused rotary + KV write and decode attention, gpu-marked"
timeout "$(left 150)" "${PYTEST[@]}" --timeout 120 tests/kernels/test_elementwise.py \
  tests/kernels/test_attention.py -k "${T1:-rotary_write_kv or decode}" 2>&1 | tee "$OUT/gpu_tests1.log" \
  | tail -6 | tee -a "$LOG"

if [ "${SWEEP:-1}" != 0 ]; then
  step "2. decode attention sweep"
  # shellcheck disable=SC2086  # SWEEP_ARGS: arguments, word-split
  timeout "$(left 220)" python3 bench/decode_attention_sweep.py --out "$OUT" \
    ${SWEEP_ARGS:---budget-s 140 --fused-budget-s 40} \
    2>&1 | tee -a "$LOG" | tail -14
fi

if [ "${GEMV:-0}" != 0 ]; then
  step "2b. skinny linear (fused prologue) sweep"
  # shellcheck disable=SC2086  # GEMV_ARGS: arguments, word-split
  timeout "$(left 200)" python3 bench/gemv_sweep.py --out "$OUT" ${GEMV_ARGS:---budget-s 150} \
    2>&1 | tee -a "$LOG" | tail -20
fi

if [ "${MIXED:-1}" != 0 ]; then
  step "3. mixed steps"
  timeout "$(left 170)" python3 bench/mixed_steps.py --out "$OUT" 2>&1 | tee -a "$LOG" | tail -16
fi

if [ -n "${BEFORE:-}" ]; then
  step "4a. serving_gpu.py, before ($BEFORE)"
  mkdir -p "$OUT/before"
  # shellcheck disable=SC2086
  PYTHONPATH="$PWD/$BEFORE${PYTHONPATH:+:$PYTHONPATH}" timeout "$(left 110)" \
    python3 "$BEFORE/bench/serving_gpu.py" --out "$OUT/before" \
    ${BEFORE_ARGS:---runs 2 --no-transformers --no-profile} 2>&1 | tee -a "$LOG" | tail -6
fi
step "4b. serving_gpu.py, this tree"
# shellcheck disable=SC2086
timeout "$(left 130)" python3 bench/serving_gpu.py --out "$OUT" \
  ${SERVING_ARGS:---runs 2 --no-transformers} 2>&1 | tee -a "$LOG" | tail -24

if [ "${PREFILL_SDPA:-0}" != 0 ]; then
  step "4c. prefill attention vs torch SDPA backends (1k/4k/16k)"
  timeout "$(left 120)" python3 bench/kernel_speed.py --sections prefill --out "$OUT" \
    2>&1 | tee -a "$LOG" | tail -12
fi

l=$(left 240)
if [ "$l" -gt 30 ]; then
  step "5. gpu-marked tests ($l s)"
  # shellcheck disable=SC2086  # TESTS: paths, word-split
  timeout "$l" "${PYTEST[@]}" --timeout 200 \
    ${TESTS:-tests/kernels tests/engine/test_gpu_engine.py tests/engine/test_bf16_numerics.py} \
    2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -E "bf16 relative|passed|failed|FAILED|Error" | tail -20 | tee -a "$LOG"
else
  step "5. gpu-marked tests skipped: ${l} s left"
fi
step "done"
