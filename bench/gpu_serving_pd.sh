#!/usr/bin/env bash
# Issue 9 part 2 on two GPUs of one host: 1 P + 1 D vs two both-role workers behind the same
# proxy, Llama-3.2-1B and Llama-3-8B shapes with dummy weights, token-ids-only serving,
# `pdserve bench` at a few Poisson rates. Results (JSON per point) and logs under $OUT.
# Usage: bash bench/gpu_serving_pd.sh   (carry .whl; SECONDS_PER_RATE, MODELS, MODES override)
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
eval "$(bash scripts/gpu_wheels.sh install)" || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/logs/gpu.txt"
SECS=${SECONDS_PER_RATE:-30}
MODELS=${MODELS:-"llama-3.2-1b llama-3-8b"}
MODES=${MODES:-"pd both"}
CFG=$(mktemp -d)
python3 - "$CFG" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
common = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
              hidden_act="silu", torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001,
              vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
shapes = {
  "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                       tie_word_embeddings=True),
  "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
for name, s in shapes.items():
    d = root / name; d.mkdir()
    (d / "config.json").write_text(json.dumps({**common, **s}))
PY
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null; done; sleep 3;
            for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null; done; pids=(); }
trap cleanup EXIT
wait_health() {  # url (no curl on the GPU image: python's urllib)
  python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(480):
    try:
        if urllib.request.urlopen(sys.argv[1] + "/health", timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.25)
sys.exit(1)
PY
}
fetch() { python3 -c "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())" "$1"; }
COMMON="--load-format dummy --skip-tokenizer-init --max-model-len 4096 --internal-token t0"
for model in $MODELS; do
  if [ "$model" = "llama-3-8b" ]; then RATES=${RATES_8B:-"12 24"}; else RATES=${RATES_1B:-"24 48"}; fi
  for mode in $MODES; do
    tag="$model-$mode"
    if [ "$mode" = "pd" ]; then
      python3 -m pdserve prefill --model "$CFG/$model" $COMMON --port 9100 --device 0 \
        > "$OUT/logs/$tag-p.log" 2>&1 & pids+=($!)
      python3 -m pdserve decode --model "$CFG/$model" $COMMON --port 9200 --device 1 \
        > "$OUT/logs/$tag-d.log" 2>&1 & pids+=($!)
      ROUTE="--prefill http://127.0.0.1:9100 --decode http://127.0.0.1:9200"
    else
      python3 -m pdserve worker --role both --model "$CFG/$model" $COMMON --port 9100 --device 0 \
        > "$OUT/logs/$tag-w0.log" 2>&1 & pids+=($!)
      python3 -m pdserve worker --role both --model "$CFG/$model" $COMMON --port 9200 --device 1 \
        > "$OUT/logs/$tag-w1.log" 2>&1 & pids+=($!)
      ROUTE="--worker http://127.0.0.1:9100 --worker http://127.0.0.1:9200"
    fi
    ok=1; wait_health http://127.0.0.1:9100 && wait_health http://127.0.0.1:9200 || ok=0
    if [ $ok = 1 ]; then
      python3 -m pdserve serve --model "$CFG/$model" --skip-tokenizer-init --internal-token t0 \
        --port 8000 --min-pd-prompt-tokens 0 $ROUTE > "$OUT/logs/$tag-proxy.log" 2>&1 & pids+=($!)
      wait_health http://127.0.0.1:8000 || ok=0
    fi
    if [ $ok = 1 ]; then
      for rate in $RATES; do
        n=$((rate * SECS))
        timeout $((SECS * 3 + 60)) python3 -m pdserve bench --base-url http://127.0.0.1:8000 \
          --num-prompts "$n" --request-rate "$rate" --input-len-dist sharegpt --input-len 512 \
          --output-len 128 --vocab-high 128000 --slo-ttft-ms 500 --slo-tpot-ms 50 --no-progress \
          --result-json "$OUT/$tag-r$rate.json" > "$OUT/logs/$tag-r$rate.txt" 2>&1
        echo "== $tag rate $rate"; tail -25 "$OUT/logs/$tag-r$rate.txt"
      done
      fetch http://127.0.0.1:8000/metrics | grep -E "^pdserve_proxy_(routing|retries|failovers|transfer)" \
        > "$OUT/logs/$tag-proxy-metrics.txt"
    else
      echo "== $tag: workers or proxy did not come up"
      for f in "$OUT/logs/$tag-"*.log; do echo "-- $f"; tail -n 8 "$f"; done
    fi
    cleanup
  done
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
python3 - <<'PY'
import glob, json, os
print("\n| run | ok/failed | goodput req/s | TTFT p50/p99 ms | token-2 p50 ms | TPOT p50 ms | ITL p99 ms |")
print("|---|---|---|---|---|---|---|")
def ms(s, k, p):
    v = (s.get(k) or {}).get(p)
    return "-" if v is None else f"{v * 1e3:.1f}"
for f in sorted(glob.glob(os.path.join(os.environ.get("OUT", "/tmp/out"), "*.json"))):
    s = json.load(open(f))["runs"][0]["summary"]
    gp = s.get("goodput")
    print(f"| {os.path.basename(f)[:-5]} | {s['completed']}/{s['failed']} | "
          f"{'-' if gp is None else f'{gp:.2f}'} | {ms(s,'ttft','p50')}/{ms(s,'ttft','p99')} | "
          f"{ms(s,'token2','p50')} | {ms(s,'tpot','p50')} | {ms(s,'itl','p99')} |")
PY
