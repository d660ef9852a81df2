"""The generation routes' fast path (proxy/fast_path.py) answers as the framework does: the
same requests, good and bad, sent to an app with the fast path and to one without
(`create_app(..., fast_path=False)`), over real servers on the same backend, give the same
statuses, bodies (ids and timestamps aside) and headers; requests the fast path does not
take (an Origin header, other routes) still reach the framework's layers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import REGISTRY

from pdserve.proxy import create_app
from pdserve.proxy.fast_path import FastPath
from tests.proxy.conftest import API_KEY, MODEL, Served, serve, sse_events, wait_until_idle
from tests.proxy.local_backend import LocalBackend

pytestmark = pytest.mark.timeout(120)
LIMIT = 4096


@pytest.fixture(scope="module")
def pair(backend: LocalBackend) -> Iterator[tuple[Served, Served]]:
    apps = [create_app(backend, api_keys=[API_KEY], max_body_bytes=LIMIT, fast_path=fast)
            for fast in (True, False)]
    assert isinstance(apps[0], FastPath) and not isinstance(apps[1], FastPath)
    for app in apps:  # as pdserve serve assembles it (add_middleware reaches the FastAPI app)
        app.add_middleware(CORSMiddleware, allow_origins=["https://ui.example"],
                           allow_methods=["*"], allow_headers=["*"])
    with serve(apps[0]) as fast, serve(apps[1]) as framework:
        yield fast, framework


AUTH = {"Authorization": f"Bearer {API_KEY}"}
SHORT = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0,
         "ignore_eos": True}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 5, "temperature": 0, "ignore_eos": True}


def _stable(body: Any) -> Any:
    """A body without what differs per response: ids and creation times."""
    if isinstance(body, dict):
        return {k: _stable(v) for k, v in body.items() if k not in ("id", "created")}
    if isinstance(body, list):
        return [_stable(v) for v in body]
    return body


def _both(pair: tuple[Served, Served], method: str, path: str, **kw: Any
          ) -> tuple[httpx.Response, httpx.Response]:
    out = []
    for s in pair:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.request(method, path, **kw)
            r.read()
            out.append(r)
    return out[0], out[1]


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("completion", "/v1/completions", {"json": SHORT, "headers": AUTH}),
    ("completion, logprobs and token ids", "/v1/completions",
     {"json": {**SHORT, "logprobs": 2, "return_token_ids": True}, "headers": AUTH}),
    ("chat", "/v1/chat/completions", {"json": CHAT, "headers": AUTH}),
    ("invocations: chat", "/invocations", {"json": CHAT, "headers": AUTH}),
    ("invocations: neither", "/invocations", {"json": {"input": "x"}, "headers": AUTH}),
    ("no key", "/v1/completions", {"json": SHORT}),
    ("wrong key", "/v1/completions", {"json": SHORT, "headers": {"Authorization": "Bearer x"}}),
    ("unknown model", "/v1/completions", {"json": {**SHORT, "model": "nope"}, "headers": AUTH}),
    ("bad parameter", "/v1/completions", {"json": {**SHORT, "temperature": -1},
                                          "headers": AUTH}),
    ("not JSON", "/v1/completions", {"content": b"{not json", "headers": {
        **AUTH, "Content-Type": "application/json"}}),
    ("wrong content type", "/v1/completions", {"content": json.dumps(SHORT).encode(),
                                               "headers": {**AUTH, "Content-Type": "text/plain"}}),
    ("a lone surrogate", "/v1/completions", {"content": b'{"model": "%s", "prompt": "a\\ud800"}'
                                             % MODEL.encode(), "headers": {
                                                 **AUTH, "Content-Type": "application/json"}}),
    ("nested too deeply", "/v1/completions", {"content": b'{"prompt": ' + b"[" * 1500 + b"]"
                                              * 1500 + b"}", "headers": {
                                                  **AUTH, "Content-Type": "application/json"}}),
    ("NaN (the standard library's JSON)", "/v1/completions", {
        "content": b'{"model": "%s", "prompt": "a", "temperature": NaN}' % MODEL.encode(),
        "headers": {**AUTH, "Content-Type": "application/json"}}),
    ("not an object", "/v1/chat/completions", {"json": [1, 2], "headers": AUTH}),
    ("too large by Content-Length", "/v1/completions",
     {"json": {**SHORT, "prompt": "x" * (2 * LIMIT)}, "headers": AUTH}),
    ("too long for the model", "/v1/completions",
     {"json": {**SHORT, "max_tokens": 10**6}, "headers": AUTH}),
]


@pytest.mark.parametrize("name,path,kw", CASES, ids=[c[0] for c in CASES])
def test_the_same_answer_with_and_without_the_fast_path(pair: tuple[Served, Served],
                                                        backend: LocalBackend, name: str,
                                                        path: str, kw: dict[str, Any]) -> None:
    fast, framework = _both(pair, "POST", path, **kw)
    assert fast.status_code == framework.status_code, (name, fast.text, framework.text)
    assert _stable(fast.json()) == _stable(framework.json())
    for h in ("content-type", "www-authenticate", "connection", "retry-after"):
        assert fast.headers.get(h) == framework.headers.get(h), h
    assert fast.headers.get("x-request-id") and framework.headers.get("x-request-id")
    wait_until_idle(backend)


def _served_by_fast_path(path: str, status: int) -> float:
    # only the fast path counts here: these apps have no RequestCountMiddleware
    return REGISTRY.get_sample_value("pdserve_proxy_http_requests_total",
                                     {"endpoint": path, "status": str(status)}) or 0.0


def test_streams_match_and_request_ids_echo(pair: tuple[Served, Served]) -> None:
    before = _served_by_fast_path("/v1/chat/completions", 200)
    events = []
    for s in pair:
        with httpx.Client(base_url=s.url, timeout=60, headers=AUTH) as c, c.stream(
                "POST", "/v1/chat/completions", headers={"X-Request-Id": "my-id-1"},
                json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"] == "my-id-1"
            evs = sse_events(r)
            assert evs[-1] == "[DONE]" and evs[0]["id"] == "chatcmpl-my-id-1"
            events.append(_stable(evs))
    assert events[0] == events[1]
    assert _served_by_fast_path("/v1/chat/completions", 200) == before + 1


def test_a_body_over_the_limit_without_a_length_is_refused_while_read(
        pair: tuple[Served, Served]) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check first
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(2 * LIMIT // 512):
            yield b"x" * 512
        yield b'"}'

    for s in pair:
        with httpx.Client(base_url=s.url, timeout=60, headers=AUTH) as c:
            r = c.post("/v1/completions", content=chunks(),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"


def test_cross_origin_requests_still_get_the_cors_layer(pair: tuple[Served, Served]) -> None:
    fast, framework = _both(pair, "POST", "/v1/completions", json=SHORT,
                            headers={**AUTH, "Origin": "https://ui.example"})
    assert fast.status_code == framework.status_code == 200
    assert fast.headers["access-control-allow-origin"] == "https://ui.example"
    assert framework.headers["access-control-allow-origin"] == "https://ui.example"
    fast, framework = _both(pair, "OPTIONS", "/v1/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
    assert fast.status_code == framework.status_code == 200
    # other routes and methods are the framework's
    fast, framework = _both(pair, "GET", "/v1/completions", headers=AUTH)
    assert fast.status_code == framework.status_code == 405
    fast, framework = _both(pair, "GET", "/v1/models", headers=AUTH)
    assert _stable(fast.json()) == _stable(framework.json())  # each app its own "created"


def test_a_client_gone_while_its_body_is_read_leaves_nothing(pair: tuple[Served, Served],
                                                             backend: LocalBackend) -> None:
    """Half a body, then the client hangs up: no answer is owed, no task stays behind, and
    the next request is served."""
    import socket

    from tests.proxy.test_streaming import wait_for_tasks

    fast = pair[0]
    baseline = fast.num_tasks()
    host, port = fast.url.removeprefix("http://").split(":")
    body = json.dumps(SHORT).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                     + API_KEY.encode() + b"\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body[:len(body) // 2])
        time.sleep(0.2)  # the fast path is waiting for the rest
    wait_for_tasks(fast, baseline)
    with httpx.Client(base_url=fast.url, timeout=60, headers=AUTH) as c:
        assert c.post("/v1/completions", json=SHORT).status_code == 200
    wait_until_idle(backend)
