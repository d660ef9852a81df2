"""Overload through `pdserve serve` (a local 1 P + 1 D on the built-in model, D limited to 2
sequences): a burst far over capacity gets answers only — completions for what the proxy
admitted, 429 with Retry-After for the rest, at once when its queue is full or after
--max-queue-delay — nothing hangs, and the cluster serves normally afterwards."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.bench.test_clusters import wait_healthy
from tests.workers.cluster import free_port_block

pytestmark = pytest.mark.timeout(300)


async def burst(url: str, n: int) -> list[tuple[int, float, httpx.Headers, dict]]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        async def one(i: int):
            t0 = time.monotonic()
            r = await c.post(url + "/v1/completions", json={
                "model": "pdserve-builtin-tiny", "prompt": [5 + i] * 24, "max_tokens": 48,
                "ignore_eos": True, "temperature": 0, "priority": i % 3})
            return r.status_code, time.monotonic() - t0, r.headers, r.json()
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_burst_over_capacity_gets_completions_or_429_and_nothing_hangs(procs):
    port, workers = free_port_block(1), free_port_block(6)
    url = f"http://127.0.0.1:{port}"
    procs.start("proxy", "-m", "pdserve", "serve", "--port", str(port), "--worker-base-port",
                str(workers), "--max-num-seqs", "2", "--max-model-len", "256",
                "--min-pd-prompt-tokens", "0", "--max-queued-requests", "4",
                "--max-queue-delay", "1.5")
    wait_healthy(procs, url, "proxy")
    t0 = time.monotonic()
    results = asyncio.run(burst(url, 40))
    assert time.monotonic() - t0 < 60
    codes = [code for code, *_ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 20, codes
    for code, secs, headers, body in results:
        if code == 429:
            assert int(headers["retry-after"]) >= 1 and body["error"]["type"] == "RateLimitError"
            assert secs < 1.5 + 5  # at once (queue full) or at the queue deadline, not later
        else:
            assert body["usage"]["completion_tokens"] == 48
    full = [b for c, _, _, b in results if c == 429 and "are waiting" in b["error"]["message"]]
    late = [b for c, _, _, b in results if c == 429 and "within 1.5 s" in b["error"]["message"]]
    assert full and len(full) + len(late) == codes.count(429)
    metrics = httpx.get(url + "/metrics").text
    assert 'pdserve_proxy_rejected_requests_total{reason="queue_full"}' in metrics
    assert "pdserve_proxy_queued_requests 0.0" in metrics
    # and it serves normally afterwards
    again = asyncio.run(burst(url, 2))
    assert [code for code, *_ in again] == [200, 200]
