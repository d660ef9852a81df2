"""Proxy operations with fake engines (bench/fake_worker.py) behind a real `pdserve serve`:
CORS preflight, several proxy processes on one port, and SIGTERM draining a running stream."""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.bench.test_clusters import Procs, descendants, wait_healthy
from tests.workers.cluster import free_port_block

ORIGIN = "http://app.example"


def start_cluster(procs: Procs, *proxy_args: str) -> tuple[str, object]:
    w_port, port = free_port_block(2), free_port_block(1)
    procs.start("fake", "bench/fake_worker.py", "--role", "both", "--port", str(w_port),
                "--ttft-ms", "10", "--itl-ms", "50")
    proxy = procs.start("proxy", "-m", "pdserve", "serve", "--worker",
                        f"http://127.0.0.1:{w_port}", "--port", str(port), *proxy_args)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(procs, url, "proxy")
    return url, proxy


def completion(url: str, n: int = 4) -> dict:
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": model, "prompt": [5, 6, 7], "max_tokens": n, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_cors_and_several_proxy_processes(procs: Procs) -> None:
    url, proxy = start_cluster(procs, "--api-server-count", "2",
                               "--allowed-origins", json.dumps([ORIGIN]))
    r = httpx.options(url + "/v1/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(url + "/v1/completions", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    assert len(descendants(proxy.pid)) >= 1  # a second proxy process shares the port
    for _ in range(8):  # new connections land on either process; every one is served
        assert completion(url)["usage"]["completion_tokens"] == 4


def test_sigterm_drains_a_running_stream(procs: Procs) -> None:
    url, proxy = start_cluster(procs, "--shutdown-timeout", "20")
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    chunks = 0
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "model": model, "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True,
            "stream": True}) as r:
        t0 = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if chunks == 2:
                    proxy.send_signal(signal.SIGTERM)  # mid-stream: ~1.4 s of tokens left
            if line == "data: [DONE]":
                break
    assert chunks == 30 and time.monotonic() - t0 > 1.0
    proxy.wait(20)  # then it exits
    try:
        httpx.get(url + "/health", timeout=2)
        raise AssertionError("the proxy still answers after its drain")
    except httpx.HTTPError:
        pass
