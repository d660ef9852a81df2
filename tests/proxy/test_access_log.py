"""The access log (proxy/access_log.py): one line per answered request on `pdserve.access`,
written when the response has ended; generations add their id, tokens and TTFT; answers
the fast path gives (401, 400) and ones the framework gives (GET routes, CORS) both log;
an app made without it logs nothing."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from pdserve.proxy import create_app
from tests.proxy.conftest import API_KEY, MODEL, Served, serve
from tests.proxy.local_backend import LocalBackend

pytestmark = pytest.mark.timeout(120)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def logged(backend: LocalBackend) -> Iterator[Served]:
    with serve(create_app(backend, api_keys=[API_KEY], access_log=True)) as s:
        yield s


def lines(caplog: pytest.LogCaptureFixture, n: int) -> list[str]:
    deadline = time.monotonic() + 10  # a stream's line comes after its last byte
    while time.monotonic() < deadline:
        got = [r.getMessage() for r in caplog.records if r.name == "pdserve.access"]
        if len(got) >= n:
            return got
        time.sleep(0.02)
    return [r.getMessage() for r in caplog.records if r.name == "pdserve.access"]


def test_one_line_per_request_with_generation_fields(
        logged: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdserve.access")
    with httpx.Client(base_url=logged.url, timeout=60, headers=AUTH) as c:
        r = c.post("/v1/completions", headers={"X-Request-Id": "acc-1"}, json={
            "model": MODEL, "prompt": "Hello there", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200
        prompt = r.json()["usage"]["prompt_tokens"]
        with c.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3, "ignore_eos": True, "stream": True}) as s:
            assert s.status_code == 200
            s.read()
        assert c.get("/v1/models").status_code == 200
        assert httpx.post(logged.url + "/v1/completions", json={}).status_code == 401
        assert c.post("/v1/completions", json={"model": MODEL}).status_code == 400
    got = lines(caplog, 5)
    assert len(got) == 5, got

    def one(pattern: str) -> str:  # a stream's line follows its last byte: order may vary
        found = [ln for ln in got if re.search(pattern, ln)]
        assert len(found) == 1, (pattern, got)
        return found[0]

    assert re.fullmatch(r'127\.0\.0\.1:\d+ "POST /v1/completions" 200 \d+\.\d{3}s '
                        rf'id=cmpl-acc-1-\w+ prompt={prompt} completion=5 ttft=\d+\.\d{{3}}s',
                        one(r'" 200 .* id=cmpl-acc-1-')), got
    one(r'"POST /v1/chat/completions" 200 .* completion=3 ttft=')
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "GET /v1/models" 200 \d+\.\d{3}s',
                        one(r'"GET /v1/models"')), got
    assert "id=" not in one(r'"POST /v1/completions" 401 ')
    one(r'"POST /v1/completions" 400 ')


def test_no_lines_without_it(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdserve.access")
    with httpx.Client(base_url=served.url, timeout=60, headers=AUTH) as c:
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                               "max_tokens": 2}).status_code == 200
        assert c.get("/v1/models").status_code == 200
    time.sleep(0.2)
    assert not [r for r in caplog.records if r.name == "pdserve.access"]
