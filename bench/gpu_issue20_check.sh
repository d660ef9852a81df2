#!/usr/bin/env bash
# One device run: the gpu-marked local-cluster test, then bench/structured.py (Llama-3-8B
# shapes, JSON schema vs plain) from BEFORE=<dir> (an earlier tree inside this one, e.g.
# `git archive <commit> | tar -x -C before_tree`) and from this tree. Logs under $OUT.
# Usage (repo root, on the lent machine; carry [".whl"]): BEFORE=before_tree bash bench/gpu_issue20_check.sh
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
eval "$(bash scripts/gpu_wheels.sh install 2>/dev/null)"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 300 python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu \
  --timeout 280 tests/e2e/test_gpu_local_cluster.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -3 || true
root=$PWD
cd /tmp
if [ -n "${BEFORE:-}" ]; then
  mkdir -p "$OUT/before"
  PYTHONPATH="$root/$BEFORE${PYTHONPATH:+:$PYTHONPATH}" python3 "$root/$BEFORE/bench/structured.py" \
    --llama3-8b --device cuda --runs 3 --out "$OUT/before" 2>&1 | tail -4
fi
python3 "$root/bench/structured.py" --llama3-8b --device cuda --runs 3 --out "$OUT" 2>&1 | tail -4
