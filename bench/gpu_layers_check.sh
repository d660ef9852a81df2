#!/usr/bin/env bash
# One device run after the layers refactor (issue 12): the gpu-marked engine, block-copy and
# KV-transfer tests on this GPU, then a local `pdserve serve` P/D cluster on GPU 0 (P and D on
# the same GPU, KV over cuda_ipc) answering requests whose greedy text is compared with the
# offline engine on the same GPU. Logs under $OUT; a short summary prints last.
# Usage (repo root, on the lent machine; carry [".whl"] after `bash scripts/gpu_wheels.sh fetch`)
set -e; eval "$(bash scripts/gpu_wheels.sh install)"
set +e -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_layers_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PDSERVE_CACHE_DIR=/tmp/pdserve-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
(cd /tmp && python3 -c "import pdserve.service.loop, pdserve.kv_transfer.transports; print('imports ok')")

start=$(date +%s)
timeout 420 python3 -m pytest -p no:cacheprovider --import-mode=append -q -rfE -m gpu \
  --timeout 300 tests/engine tests/kernels/test_block_copy.py tests/kv_transfer \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "gpu tests: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"

# from /tmp: run outside the checkout, as a user would
(cd /tmp && python3 - <<'EOF') 2>&1 | tee "$OUT/pd_smoke.log" | tail -12
import json, os, subprocess, sys, time
import httpx
out = os.environ.get("OUT", "/tmp/gpu_layers_out")
log = open(f"{out}/serve.log", "w")
t0 = time.monotonic()
proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--local-devices", "0", "0",
                         "--min-pd-prompt-tokens", "0", "--port", "18000", "--max-model-len", "2048",
                         "--kv-cache-memory-bytes", str(2 << 30)], stdout=log, stderr=subprocess.STDOUT)
url = "http://127.0.0.1:18000"
try:
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() - t0 < 300, "serve did not come up"
        time.sleep(0.5)
    print(f"cluster up in {time.monotonic() - t0:.1f} s")
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    prompts = [[5 + (7 * i + 3 * k) % 4000 for k in range(40 + 13 * i)] for i in range(6)]
    got = []
    for p in prompts:
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 2})
        r.raise_for_status()
        got.append(r.json()["choices"][0]["token_ids"])
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompts[0], "max_tokens": 16, "n": 3, "temperature": 0.8,
        "seed": 7, "stream": True})
    print("stream with n=3:", r.status_code, sum(1 for x in r.text.splitlines() if x.startswith("data: {")), "chunks")
    health = httpx.get(url + "/health").json()
    loads = {w["role"]: w["load"] for w in health["workers"]}
    print("D transports:", [w["transport"] for w in health["workers"] if w["role"] == "decode"],
          "fallbacks:", loads.get("decode", {}).get("kv_transfer_fallbacks"))
finally:
    proc.terminate()
    proc.wait(60)
from pdserve import LLM, SamplingParams
llm = LLM(None, use_tqdm_on_load=False, max_model_len=2048, kv_cache_memory_bytes=2 << 30)
want = [o.outputs[0].token_ids for o in llm.generate(
    [{"prompt_token_ids": p} for p in prompts],
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)]
same = [g == w for g, w in zip(got, want)]
print(f"P/D over cuda_ipc == offline engine (greedy, bf16, same GPU): {sum(same)}/{len(same)}")
for i, (g, w) in enumerate(zip(got, want)):
    if g != w:
        k = next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)
        print(f"  prompt {i}: first divergence at token {k}: {g[k]} vs {w[k]}")
EOF
echo "---- summary" ; cat "$OUT/summary.txt"; tail -4 "$OUT/pd_smoke.log"
