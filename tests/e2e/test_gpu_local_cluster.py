"""On one GPU, `pdserve serve --local-devices 0` with every other option at its default: a
prefill and a decode worker on GPU 0 that split its memory (--gpu-memory-utilization 0.45
each), come up, and serve a prompt long enough to go through P, then D, over cuda_ipc; the
greedy text equals the offline engine's on the same GPU. gpu-marked: skipped without CUDA."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench.test_clusters import Procs, wait_healthy
from tests.workers.cluster import free_port_block

pytestmark = pytest.mark.gpu

PROMPT = ("Explain, in one sentence, what a prefill worker and a decode worker each do, and "
          "why a serving cluster would run them as separate processes on its GPUs.")


def test_local_devices_0_comes_up_and_serves(procs: Procs) -> None:
    import httpx

    from pdserve import SamplingParams
    from pdserve.engine.builtin_model import builtin_model_path
    from pdserve.engine.llm import LLM

    port = free_port_block(1)
    procs.start("proxy", "-m", "pdserve", "serve", "--local-devices", "0", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(procs, url, "proxy", timeout=400, serves="prefill/decode")
    # httpx, not the openai SDK: the GPU machines' image has no openai package (the CPU
    # tests drive the same surface with the SDK)
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "pdserve-builtin-tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 16 and out["usage"]["prompt_tokens"] >= 16
    log = (procs.tmp / "proxy.log").read_text()
    assert "2 local workers on shared GPUs: --gpu-memory-utilization 0.45 each" in log, log[-3000:]
    # P computed the prompt and D pulled its KV over cuda_ipc
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert re.search(r'pdserve_proxy_routing_decisions_total\{[^}]*route="pd"[^}]*\} 1\.0',
                     metrics), metrics[-3000:]
    health = httpx.get(url + "/health", timeout=5).json()
    assert "prefill/decode" in str(health.get("serves"))
    model = builtin_model_path(Path(procs.env["PDSERVE_CACHE_DIR"]))
    llm = LLM(str(model), device="cuda", use_tqdm_on_load=False,
              kv_cache_memory_bytes=1 << 30)
    want = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16),
                        use_tqdm=False)[0].outputs[0].text
    assert out["choices"][0]["text"] == want
