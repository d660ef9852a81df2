# Sourced (not run) by the bench/gpu_*.sh scripts of one device call, from the repo root with
# $OUT set: the environment every step shares, the machine's facts to $OUT/machine.txt, the
# carried wheels (.whl/, scripts/gpu_wheels.sh) installed, and this checkout installed
# editable (the pdserve.* namespace maps the top-level folders). `el` prints the seconds since
# it was sourced (the call's clock, for each step's banner); `pulls_alone` runs issue 24's
# pulls without an engine.
start=$(date +%s)
el() { echo "+$(( $(date +%s) - start )) s"; }
# Issue 24's pulls alone (no engine), the full-grid cuts in $CONFIGS beside the same-run copy:
# pulls_alone REPS SECONDS TOKENS... (bench/pull_beside_decode.py --methods ",", one run each)
pulls_alone() {
  local reps=$1 limit=$2 tok
  shift 2
  for tok in "$@"; do
    echo "== $tok-token pulls alone ($(el))"
    timeout "$limit" python3 bench/pull_beside_decode.py --out "$OUT/pull$tok" --tokens "$tok" \
      --reps "$reps" --methods "," --alone-configs "$CONFIGS" 2>&1 | tee "$OUT/pull$tok.log" \
      | tail -10
  done
}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# NVLink multicast stays off on shared multi-GPU hosts (KINDS.md); children inherit these
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PDSERVE_CACHE_DIR=${PDSERVE_CACHE_DIR:-/tmp/pdserve-cache}
{ nproc
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -6; } | tee "$OUT/machine.txt"
eval "$(bash scripts/gpu_wheels.sh install)" >/dev/null 2>"$OUT/wheels.log" || {
  echo "wheels failed"; tail -5 "$OUT/wheels.log"; exit 1; }
timeout 90 python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/pip.log" 2>&1 \
  || echo "pip install -e failed (pip.log)"
