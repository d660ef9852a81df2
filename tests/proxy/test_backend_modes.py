"""The app over other backends: token-ids-only mode (no tokenizer), and backends that fail
(refusal before streaming, failure mid-stream, unhealthy)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import openai
import pytest

from pdserve.proxy import BackendError, ChoiceDelta, GenerationRequest, create_app
from tests.proxy.conftest import MODEL, Served, serve, sse_events, wait_until_idle
from tests.proxy.local_backend import LocalBackend
from tests.proxy.openapi_schema import COMPLETION_CHUNK, validate


class TokenIdsOnly:
    """The session's engine, presented without a tokenizer."""

    def __init__(self, inner: LocalBackend):
        self.inner = inner
        self.model_name = inner.model_name
        self.model_path = inner.model_path
        self.max_model_len = inner.max_model_len
        self.vocab_size = inner.vocab_size
        self.tokenizer = None

    def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        return self.inner.generate(req)

    async def wait_ready(self, timeout: float) -> bool:
        return True

    async def health(self) -> dict[str, Any]:
        return await self.inner.health()


class Failing:
    """Yields `good` batches of one token, then fails with `error` (or refuses at once)."""

    model_name = MODEL
    model_path = None
    max_model_len = 2048
    vocab_size = 4096

    def __init__(self, tokenizer: Any, error: Exception, good: int = 2, healthy: bool = True):
        self.tokenizer = tokenizer
        self.error = error
        self.good = good
        self.healthy = healthy
        self.closed = 0

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        try:
            for _ in range(self.good):
                yield [ChoiceDelta(i, [300]) for i in req.choice_indices()]
            raise self.error
        finally:
            self.closed += 1

    async def wait_ready(self, timeout: float) -> bool:
        return True

    async def health(self) -> dict[str, Any]:
        return {"healthy": self.healthy}


@pytest.fixture(scope="module")
def ids_only(backend: LocalBackend) -> Iterator[Served]:
    with serve(create_app(TokenIdsOnly(backend), served_model_name="ids-model")) as s:
        yield s


def test_token_ids_only_mode(ids_only: Served, backend: LocalBackend) -> None:
    with httpx.Client(base_url=ids_only.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "ids-model", "prompt": [0, 5, 6],
                                            "max_tokens": 5, "ignore_eos": True, "logprobs": 1,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        data = r.json()
        validate("CreateCompletionResponse", data)
        choice = data["choices"][0]
        assert choice["text"] == "" and len(choice["token_ids"]) == 5
        assert data["prompt_token_ids"] == [0, 5, 6]
        assert choice["logprobs"]["tokens"][0] == f"token_id:{choice['token_ids'][0]}"
        with c.stream("POST", "/v1/completions", json={
                "prompt": [[0, 5, 6]], "max_tokens": 5, "ignore_eos": True, "stream": True,
                "temperature": 0}) as s:
            events = sse_events(s)
        for e in events[:-1]:
            validate(COMPLETION_CHUNK, e)
        assert [t for e in events[:-1] for ch in e["choices"] for t in ch["token_ids"]] \
            == choice["token_ids"]
        for path, body, param in [
            ("/v1/completions", {"prompt": "text"}, "prompt"),
            ("/v1/completions", {"prompt": [0, 5], "stop": ["x"]}, "stop"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
             "messages"),
            ("/tokenize", {"prompt": "hi"}, "prompt"),
        ]:
            r = c.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "token-ids-only" in r.json()["error"]["message"]
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["ids-model"]
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": [5]}).status_code == 404
    wait_until_idle(backend)


def test_failures(backend: LocalBackend) -> None:
    mid = Failing(backend.tokenizer, BackendError("decode worker lost"))
    with serve(create_app(mid)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        err = events[-2]
        validate("ErrorResponse", err)
        assert err["error"]["type"] == "ServiceUnavailableError"
        assert "decode worker lost" in err["error"]["message"]
        for e in events[:-2]:
            validate("CreateChatCompletionStreamResponse", e)
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError):
            for _ in sdk.completions.create(model=MODEL, prompt="x", stream=True):
                pass
        sdk.close()
        assert mid.closed == 3  # every backend generator was closed
    refused = Failing(backend.tokenizer, ValueError("prompt refused by the worker"), good=0,
                      healthy=False)
    with serve(create_app(refused)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": "x", "stream": stream})
            assert r.status_code == 400, r.text  # before any byte of the stream
            assert r.json()["error"]["message"] == "prompt refused by the worker"
        assert c.get("/health").status_code == 503
        assert c.get("/ping").status_code == 503


def test_several_served_model_names(backend: LocalBackend) -> None:
    """--served-model-name a b (vLLM takes several): /v1/models lists each, a request may
    name any of them and its response carries the name it used; a request without one gets
    the first; another name is 404 model_not_found."""
    with serve(create_app(TokenIdsOnly(backend), served_model_name=["first", "alias"])) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["first", "alias"]
        body = {"prompt": [0, 5, 6], "max_tokens": 2, "ignore_eos": True}
        for asked, answered in (("alias", "alias"), ("first", "first"), (None, "first")):
            r = c.post("/v1/completions", json={**body, **({"model": asked} if asked else {})})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == answered
        r = c.post("/v1/completions", json={**body, "model": "other"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


class RefusesOne:
    """Streams one token per 20 ms for every prompt, but refuses a prompt holding token 13
    before its first token, and fails a prompt holding token 14 after two; counts the
    generators opened and closed."""

    model_name = MODEL
    model_path = None
    max_model_len = 2048
    vocab_size = 4096
    tokenizer = None

    def __init__(self) -> None:
        self.opened = self.closed = 0

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        import asyncio

        self.opened += 1
        try:
            for k in range(50):
                if 13 in req.prompt_token_ids:
                    raise ValueError("prompt 13 refused by the worker")
                if 14 in req.prompt_token_ids and k == 2:
                    raise BackendError("its worker died")
                await asyncio.sleep(0.02)
                yield [ChoiceDelta(i, [300], finish_reason="length" if k == 49 else None)
                       for i in req.choice_indices()]
        finally:
            self.closed += 1

    async def wait_ready(self, timeout: float) -> bool:
        return True

    async def health(self) -> dict[str, Any]:
        return {"healthy": True}


def test_a_batch_with_one_failing_prompt_closes_every_generation() -> None:
    """A batch of prompts is one answer: a prompt refused at start makes the whole request a
    400 (the others' generations closed, nothing left running); one failing mid-stream ends
    the stream with an error event and closes the rest."""
    b = RefusesOne()
    with serve(create_app(b)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": [[5, 6], [13, 7], [8, 9]],
                                                "max_tokens": 50, "stream": stream})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == "prompt 13 refused by the worker"
            assert b.opened == b.closed
        with c.stream("POST", "/v1/completions", json={
                "prompt": [[5, 6], [14, 7]], "max_tokens": 50, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]" and "its worker died" in events[-2]["error"]["message"]
        assert b.opened == b.closed == 8
        assert s.run_in_loop(_no_generation_tasks()) == 0


async def _no_generation_tasks() -> int:
    import asyncio

    await asyncio.sleep(0.1)
    return sum(1 for t in asyncio.all_tasks() if "pump" in repr(t.get_coro()))
