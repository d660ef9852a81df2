"""The per-request path of the served stack (create_app + CORS + the request counter, as
`pdserve serve` assembles it): a client's disconnect aborts the backend request for
non-streaming and streaming requests alike with one helper task per request; the e2e
latency histogram counts each finished request once; the HTTP request counter labels by
route template ("other" for unknown paths); request ids and the body limit still hold."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import pytest
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import REGISTRY

from pdserve.proxy import ChoiceDelta, GenerationRequest, create_app, metrics
from pdserve.proxy.middleware import RequestCountMiddleware
from tests.proxy.conftest import API_KEY, MODEL, Served, serve, sse_events, wait_until_idle
from tests.proxy.local_backend import LocalBackend
from tests.proxy.test_streaming import wait_for_tasks

LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}
E2E_COUNT = "pdserve_proxy_e2e_request_latency_seconds_count"
REQUESTS = "pdserve_proxy_http_requests_total"


class Recording:
    """The session's engine; notes per request the tokens it yielded and how it ended:
    "complete" (every choice finished) or "abandoned" (closed or cancelled before)."""

    def __init__(self, inner: LocalBackend):
        self.inner = inner
        self.model_name = inner.model_name
        self.model_path = inner.model_path
        self.max_model_len = inner.max_model_len
        self.vocab_size = inner.vocab_size
        self.tokenizer = inner.tokenizer
        self.tokens: dict[str, int] = {}
        self.ended: dict[str, str] = {}

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        agen = self.inner.generate(req)
        running = set(req.choice_indices())
        self.tokens[req.request_id] = 0
        try:
            async for batch in agen:
                self.tokens[req.request_id] += sum(len(d.token_ids) for d in batch)
                running -= {d.choice_index for d in batch if d.finish_reason is not None}
                yield batch
        finally:
            await agen.aclose()  # LocalBackend aborts in the engine what did not finish
            self.ended[req.request_id] = "abandoned" if running else "complete"

    async def wait_ready(self, timeout: float) -> bool:
        return True

    async def health(self) -> dict[str, Any]:
        return await self.inner.health()


@pytest.fixture(scope="module")
def recording(backend: LocalBackend) -> Recording:
    return Recording(backend)


@pytest.fixture(scope="module")
def stack(recording: Recording) -> Iterator[Served]:
    """The middleware stack of pdserve/serve.py's build_app over the recording backend."""
    app = create_app(recording, api_keys=[API_KEY], max_body_bytes=4096)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(RequestCountMiddleware)
    with serve(app) as s:
        yield s


@pytest.fixture
def http(stack: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def e2e_count() -> float:
    return REGISTRY.get_sample_value(E2E_COUNT) or 0.0


def request_counts() -> dict[tuple[str, str], float]:
    return {(s.labels["endpoint"], s.labels["status"]): s.value
            for fam in metrics.HTTP_REQUESTS.collect() for s in fam.samples
            if s.name == REQUESTS}


def wait_counted(want: dict[tuple[str, str], float], timeout: float = 5.0) -> None:
    """The counter is bumped after the response is sent: poll until it shows `want`."""
    deadline = time.monotonic() + timeout
    while any(request_counts().get(k, 0.0) < v for k, v in want.items()):
        if time.monotonic() > deadline:
            raise AssertionError(f"counts {request_counts()}, wanted at least {want}")
        time.sleep(0.01)


def new_request(recording: Recording, before: set[str], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (new := set(recording.tokens) - before):
        assert time.monotonic() < deadline, "the request never reached the backend"
        time.sleep(0.01)
    (rid,) = new
    return rid


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_mid_generation_aborts_with_one_helper_task(
        stack: Served, recording: Recording, backend: LocalBackend, stream: bool) -> None:
    """A client that hangs up mid-generation (2000 tokens asked): the backend generator is
    closed before it finished, the engine frees everything at once, the e2e histogram does
    not count it, and while it ran the request had one task besides uvicorn's own."""
    wait_until_idle(backend)
    baseline = stack.num_tasks()
    e2e = e2e_count()
    before = set(recording.tokens)
    body = json.dumps({"model": MODEL, "prompt": "Go on:", "stream": stream, **LONG}).encode()
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                     + API_KEY.encode() + b"\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        rid = new_request(recording, before)
        deadline = time.monotonic() + 10
        while recording.tokens[rid] < 3:  # generating
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # uvicorn's task for the request + the one DisconnectWatch task; nothing else
        assert stack.num_tasks() == baseline + 2
    # the client hung up, its response unread
    t0 = time.monotonic()
    st = wait_until_idle(backend, timeout=5)  # 2000 tokens take far longer
    assert time.monotonic() - t0 < 2
    assert st["num_free_blocks"] == st["num_blocks"]
    assert recording.ended[rid] == "abandoned"
    assert recording.tokens[rid] < 1000
    wait_for_tasks(stack, baseline)
    assert e2e_count() == e2e


def test_e2e_latency_counts_each_finished_request_once(http: httpx.Client,
                                                        backend: LocalBackend) -> None:
    wait_until_idle(backend)
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "ignore_eos": True,
             "temperature": 0}
    n = e2e_count()
    assert http.post("/v1/completions", json=short).status_code == 200
    assert e2e_count() == n + 1
    with http.stream("POST", "/v1/completions", json={**short, "stream": True}) as r:
        assert sse_events(r)[-1] == "[DONE]"
    assert e2e_count() == n + 2
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "n": 3, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert sse_events(r)[-1] == "[DONE]"
    assert e2e_count() == n + 3  # one request, however many choices
    # a stop string ends it at the proxy (the engine's rest is aborted): finished all the same
    text = http.post("/v1/completions", json={**short, "max_tokens": 12}).json()[
        "choices"][0]["text"]
    assert e2e_count() == n + 4
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    r = http.post("/v1/completions", json={**short, "max_tokens": 2000, "stop": [stop]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert e2e_count() == n + 5
    # refused: not a finished request
    assert http.post("/v1/completions", json={**short, "prompt": [5, 10**9]}).status_code == 400
    assert e2e_count() == n + 5
    wait_until_idle(backend)


def test_request_counter_labels_by_route_template(stack: Served, http: httpx.Client) -> None:
    counts = request_counts()
    other = counts.get(("other", "404"), 0.0)
    models = counts.get(("/v1/models", "200"), 0.0)
    for path in ("/no/such/path", "/v1/nope", "/favicon.ico"):
        assert http.get(path).status_code == 404
    assert http.get("/v1/models").status_code == 200
    wait_counted({("other", "404"): other + 3, ("/v1/models", "200"): models + 1})
    after = request_counts()
    assert set(after) - set(counts) <= {("other", "404"), ("/v1/models", "200")}
    assert after[("other", "404")] == other + 3
    # (the generation routes are counted by the fast path in every app of this process)
    assert {e for e, _ in after} <= {"other", "/v1/models", "/v1/completions",
                                     "/v1/chat/completions", "/invocations"}

    # answered before routing or without a handler: still the route's template
    with httpx.Client(base_url=stack.url, timeout=10) as anon:
        assert anon.post("/v1/completions", json={}).status_code == 401
        assert anon.post("/v1/whatever", json={}).status_code == 401
        r = anon.options("/v1/completions", headers={"origin": "http://a.example",
                                                     "access-control-request-method": "POST"})
        assert r.status_code == 200
    assert http.get("/v1/completions").status_code == 405
    wait_counted({("/v1/completions", "401"): 1, ("other", "401"): 1,
                  ("/v1/completions", "200"): 1, ("/v1/completions", "405"): 1})


def test_request_id_and_body_limit_through_the_stack(http: httpx.Client) -> None:
    r = http.get("/v1/models", headers={"x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"
    r = http.get("/nowhere", headers={"x-request-id": "bad id with spaces"})
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32
    big = {"model": MODEL, "prompt": "x" * 5000, "max_tokens": 1}
    r = http.post("/v1/completions", json=big, headers={"x-request-id": "big-1"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "big-1"
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield json.dumps(big).encode()

    r = http.post("/v1/completions", content=chunks(),
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and "x-request-id" in r.headers
    wait_counted({("/v1/completions", "413"): 2})


def test_uvloop_and_httptools_by_default_with_a_loud_fallback(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from pdserve.config import build_config
    from pdserve.serve import ServeConfig, uvicorn_io

    with caplog.at_level(logging.WARNING, logger="pdserve.serve"):
        assert uvicorn_io(build_config(ServeConfig, [], env={})) == ("uvloop", "httptools")
        off = build_config(ServeConfig, ["--no-uvloop", "--no-httptools"], env={})
        assert uvicorn_io(off) == ("asyncio", "h11")
        assert not caplog.records
        monkeypatch.setitem(sys.modules, "httptools", None)  # import httptools: ImportError
        monkeypatch.setitem(sys.modules, "uvloop", None)
        assert uvicorn_io(build_config(ServeConfig, [], env={})) == ("asyncio", "h11")
        assert uvicorn_io(off) == ("asyncio", "h11")  # turned off: nothing to warn about
    (warning,) = caplog.records
    assert "uvloop and httptools not importable" in warning.getMessage()
