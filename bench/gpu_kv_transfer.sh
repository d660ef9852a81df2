#!/usr/bin/env bash
# One device call for the cuda_ipc KV transport: GPU info, the gpu-marked KV-transfer tests
# (real P and D processes), then bench/kv_transfer.py. Logs and JSON go under $OUT as they are
# made; the benchmark's table prints last.
# Usage (repo root, on the lent machine; the run tool's carry: [".whl"]):
#   bash bench/gpu_kv_transfer.sh            # after `bash scripts/gpu_wheels.sh fetch` here
#   SKIP_TESTS=1 BENCH_TIMEOUT=240 bash bench/gpu_kv_transfer.sh   # the benchmark alone
#   BENCH_ARGS="--gpu-tcp --reps 5" bash bench/gpu_kv_transfer.sh   # tcp (GPU pools) vs raw
set -e; eval "$(bash scripts/gpu_wheels.sh install)"
set +e -uo pipefail  # the benchmark runs even if a test fails
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_kv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared multi-GPU hosts (KINDS.md); children inherit these
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

{ nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv,noheader
  nvidia-smi topo -m || true
  python3 - <<'EOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())
try:
    import cupy
    print("cupy", cupy.__version__)
    n = torch.cuda.device_count()
    print("peer access:", {(i, j): cupy.cuda.runtime.deviceCanAccessPeer(i, j)
                           for i in range(n) for j in range(n) if i != j})
except Exception as e:  # noqa: BLE001
    print("cupy: NOT USABLE:", type(e).__name__, e)
EOF
  df -h /dev/shm | tail -1
  echo "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-}"
} 2>&1 | tee "$OUT/gpu.txt"

# The pdserve.* namespace maps top-level folders (pyproject package-dir): install editable;
# where that fails (no setuptools, no network), a symlink shim gives the same namespace.
if timeout 60 python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/pip.log" 2>&1 \
    && (cd /tmp && python3 -c "import pdserve.kv_transfer.cuda_ipc") 2>>"$OUT/pip.log"; then
  echo "pdserve: editable install"
else
  echo "pdserve: editable install failed (see pip.log); using a namespace shim"
  shim=/tmp/pdserve_shim/pdserve
  mkdir -p "$shim"
  for f in pdserve/*; do ln -sfn "$PWD/$f" "$shim/"; done
  for d in common engine kernels kv_transfer service proxy prefill_worker decode_worker; do
    ln -sfn "$PWD/$d" "$shim/$d"
  done
  export PYTHONPATH=/tmp/pdserve_shim:$PYTHONPATH:$PWD
  export PYTHONSAFEPATH=1  # `python -m pytest` must not put the repo root (its pdserve/) first
fi

start=$(date +%s)
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  # append: the installed pdserve first (the checkout's pdserve/ links the same folders)
  timeout 200 python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu \
    --timeout 90 tests/kv_transfer 2>&1 | tee "$OUT/gpu_tests.log"
  echo "gpu tests: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
fi

# shellcheck disable=SC2086  # BENCH_ARGS: arguments, word-split (e.g. "--gpu-tcp --reps 5")
timeout "${BENCH_TIMEOUT:-300}" python3 bench/kv_transfer.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log"
echo "bench: rc=${PIPESTATUS[0]}"
