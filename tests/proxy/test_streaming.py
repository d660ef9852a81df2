"""Streams end to end: the text contract over random generations, and client disconnects
(streaming, non-streaming, through the SDK) abort the engine request and free its blocks."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.proxy.conftest import API_KEY, MODEL, Served, sse_events, wait_until_idle
from tests.proxy.local_backend import LocalBackend

PIECES = ["世界", "😀", "🇯🇵", "naïve café", "Ωμέγα", "日本語", "ok", "the", "🤖 robots", "ß"]
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def one_stream(url: str, body: dict[str, Any]) -> list[Any]:
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        with c.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
            assert r.status_code == 200, r.read()
            return sse_events(r)


def test_streamed_text_equals_decode_of_all_ids(backend: LocalBackend, served: Served) -> None:
    """Random sampled generations from multi-byte prompts: per choice, the streamed text
    deltas concatenate to decode(all output ids, skip_special_tokens=True)."""
    rng = random.Random(1234)
    bodies = []
    for i in range(12):
        prompt = " ".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 6)))
        body: dict[str, Any] = {"max_tokens": rng.randrange(8, 48), "n": rng.choice([1, 2, 3]),
                                "seed": rng.randrange(2**31), "return_token_ids": True,
                                "temperature": rng.choice([0.0, 0.7, 1.0, 1.5])}
        if i % 2:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        bodies.append(body)
    with ThreadPoolExecutor(4) as pool:  # concurrent: the engine batches them
        results = list(pool.map(lambda b: one_stream(served.url, b), bodies))
    tok = backend.tokenizer
    num_partial = 0  # tokens that are part of a character: the hold-back path ran
    for body, events in zip(bodies, results):
        assert events[-1] == "[DONE]"
        chat = "messages" in body
        text: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        for e in events[:-1]:
            for c in e["choices"]:
                piece = (c["delta"].get("content") or "") if chat else c["text"]
                text[c["index"]] = text.get(c["index"], "") + piece
                ids.setdefault(c["index"], []).extend(c.get("token_ids", []))
        assert sorted(ids) == list(range(body["n"]))
        for i, out_ids in ids.items():
            assert text[i] == tok.decode(out_ids, skip_special_tokens=True), (body, i)
            num_partial += sum("\ufffd" in tok.decode([t]) for t in out_ids)
    assert num_partial > 0
    wait_until_idle(backend)


def _start_long_stream(served: Served, c: httpx.Client, backend: LocalBackend) -> None:
    with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Go on:",
                                                   "stream": True, **LONG}) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data: ")
            if lines >= 5:
                break
        assert backend.stats()["num_running"] == 1
    # leaving the block closes the unread response: the connection drops


def wait_for_tasks(served: Served, baseline: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while served.num_tasks() > baseline:
        if time.monotonic() > deadline:
            raise AssertionError(f"{served.num_tasks()} tasks in the server loop, expected "
                                 f"{baseline}")
        time.sleep(0.02)


def test_disconnect_mid_stream_aborts(backend: LocalBackend, served: Served) -> None:
    wait_until_idle(backend)
    baseline = served.num_tasks()
    t0 = time.monotonic()
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        _start_long_stream(served, c, backend)
    st = wait_until_idle(backend, timeout=5)  # 2000 tokens would take far longer
    assert st["num_free_blocks"] == st["num_blocks"]
    assert time.monotonic() - t0 < 6
    wait_for_tasks(served, baseline)


def test_sdk_stream_close_aborts(backend: LocalBackend, served: Served,
                                 client: openai.OpenAI) -> None:
    wait_until_idle(backend)
    baseline = served.num_tasks()
    s = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                       stream=True, max_tokens=2000, temperature=0,
                                       extra_body={"ignore_eos": True})
    for n, _ in enumerate(s):
        if n >= 3:
            break
    s.close()
    wait_until_idle(backend, timeout=5)
    wait_for_tasks(served, baseline)


def test_disconnect_non_streaming_aborts(backend: LocalBackend, served: Served) -> None:
    wait_until_idle(backend)
    baseline = served.num_tasks()
    with httpx.Client(base_url=served.url, timeout=httpx.Timeout(60, read=0.5),
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"model": MODEL, "prompt": "Go on:", **LONG})
    wait_until_idle(backend, timeout=5)
    wait_for_tasks(served, baseline)


def test_stop_string_aborts_the_rest(backend: LocalBackend, http: httpx.Client) -> None:
    """A stop string ends the request in the engine too (not at max_tokens)."""
    base = http.post("/v1/completions", json={"prompt": "Abc", "max_tokens": 12, **{
        k: v for k, v in LONG.items() if k != "max_tokens"}}).json()["choices"][0]["text"]
    stop = next(base[i:i + 2] for i in range(2, len(base) - 2)
                if base[i:i + 2].strip() and "\ufffd" not in base[i:i + 2])
    t0 = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": "Abc", "stop": [stop], **LONG})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    wait_until_idle(backend, timeout=5)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("stream", [True, False])
def test_a_batch_of_prompts_is_aborted_whole_when_the_client_leaves(
        backend: LocalBackend, served: Served, stream: bool) -> None:
    """A completion with a batch of prompts runs one engine request per prompt: a client
    that leaves (mid-stream, or while waiting for the body) aborts every one of them, frees
    their blocks and leaves no task behind."""
    wait_until_idle(backend)
    baseline = served.num_tasks()
    body = {"model": MODEL, "prompt": ["Go on:", "Keep going:", "And more:"], **LONG}
    with httpx.Client(base_url=served.url, timeout=httpx.Timeout(60, read=None if stream
                                                                  else 0.5),
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 6:
                        break
                assert backend.stats()["num_active"] == 3
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body)
    st = wait_until_idle(backend, timeout=5)  # 3 x 2000 tokens would take far longer
    assert st["num_free_blocks"] == st["num_blocks"]
    wait_for_tasks(served, baseline)
