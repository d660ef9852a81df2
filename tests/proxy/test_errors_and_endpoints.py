"""Error shapes and status codes, auth, and the non-completion endpoints (tokenize,
detokenize, health, ping, version, SageMaker invocations), over a real server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.proxy.conftest import API_KEY, MODEL
from tests.proxy.openapi_schema import validate

CHAT = [{"role": "user", "content": "hello"}]


def error_of(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    validate("ErrorResponse", body)
    if param is not None:
        assert body["error"]["param"] == param, body
        assert param in body["error"]["message"] or status != 400, body
    return body["error"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "n": "many"}, "n"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt.1"),
    ("/v1/completions", {"prompt": [[5], [5, 99999]]}, "prompt.1"),
    ("/v1/completions", {"prompt": ["a"] * 257}, "prompt"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True},
     "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "echo": True, "min_tokens": 1},
     "min_tokens"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "guided_regex": "[a-"}, "guided_regex"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages.0.content.0"),
])
def test_bad_parameters_are_400_naming_the_parameter(http: httpx.Client, path: str,
                                                     body: dict[str, Any], param: str) -> None:
    err = error_of(http.post(path, json={"model": MODEL, **body}), 400, param)
    assert err["type"] == "BadRequestError"


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", top_p=2)
    assert e.value.param == "top_p"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, n=0)


def test_max_tokens_over_max_model_len(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000}), 400,
                   "max_tokens")
    assert err["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 5000.")
    assert "maximum context length is 2048 tokens" in err["message"]
    err = error_of(http.post("/v1/chat/completions", json={
        "messages": CHAT, "max_completion_tokens": 2048}), 400, "max_completion_tokens")


def test_prompt_too_long(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"prompt": [7] * 2048}), 400, None)
    assert err["message"] == ("This model's maximum context length is 2048 tokens. However, your "
                              "request has 2048 input tokens. Please reduce the length of the "
                              "input messages.")
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    # an unset completions max_tokens (16) is capped to the room left instead
    r = http.post("/v1/completions", json={"prompt": [7] * 2040, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["message"] == "The model `gpt-9` does not exist." and err["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CHAT)


def test_auth(served: Any) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    with httpx.Client(base_url=served.url, timeout=30) as anon:
        err = error_of(anon.post("/v1/completions", json=body), 401)
        assert err["type"] == "AuthenticationError"
        error_of(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(anon.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401)
        assert anon.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}) \
            .status_code == 200
        assert anon.get("/v1/models", headers={"Authorization": "Bearer sk-second-key"}) \
            .status_code == 200
        # SageMaker's /invocations generates as /v1 does: guarded too (vLLM leaves it open)
        chat = {"messages": CHAT, "max_tokens": 1}
        err = error_of(anon.post("/invocations", json=chat), 401)
        assert err["type"] == "AuthenticationError" and err["code"] == "invalid_api_key"
        error_of(anon.post("/invocations", json=chat, headers={"Authorization": "Bearer wrong"}),
                 401)
        ok = anon.post("/invocations", json=chat, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.json()["object"] == "chat.completion", ok.text
        # open paths: probes, and tokenize/detokenize (they run no model), as in vLLM
        assert anon.get("/health").status_code == 200
        assert anon.get("/ping").status_code == 200 and anon.post("/ping").status_code == 200
        assert anon.post("/tokenize", json={"prompt": "a"}).status_code == 200
        assert anon.post("/detokenize", json={"tokens": [1, 2]}).status_code == 200
        assert anon.options("/v1/models").status_code != 401
    for key in ("wrong", ""):
        c = openai.OpenAI(base_url=f"{served.url}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        c.close()


def test_body_checks(http: httpx.Client, served: Any) -> None:
    err = error_of(http.post("/v1/completions", content=b'{"prompt": "x"}',
                             headers={"Content-Type": "text/plain"}), 400)
    assert "application/json" in err["message"]
    error_of(http.post("/v1/completions", content=b'{"prompt": ',
                       headers={"Content-Type": "application/json"}), 400)
    error_of(http.post("/v1/completions", json=["not", "an", "object"]), 400)
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    assert http.post("/v1/completions", content=big,
                     headers={"Content-Type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    error_of(r, 413)


def test_tokenize_detokenize(http: httpx.Client) -> None:
    text = "Hello 世界 😀!"
    t = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 2048
    assert len(t["token_strs"]) == t["count"]
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": text}
    no_bos = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert no_bos["count"] == t["count"] - 1
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    usage = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()
    assert chat["count"] == usage["usage"]["prompt_tokens"]
    error_of(http.post("/detokenize", json={"tokens": [1, 10**6]}), 400, "tokens")
    error_of(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404)


def test_health_ping_version(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["healthy"] is True
    assert http.get("/ping").status_code == 200
    assert http.post("/ping").status_code == 200
    assert http.get("/version").json() == {"version": "0.1.0"}


def test_openapi_json_and_docs(http: httpx.Client) -> None:
    """The app's own schema and its docs page answer; every operation id is unique (client
    generators break on duplicates; /ping's GET and POST once shared one)."""
    r = http.get("/openapi.json")
    assert r.status_code == 200, r.text[:500]
    spec = r.json()
    assert spec["openapi"].startswith("3.") and "/v1/chat/completions" in spec["paths"]
    from openapi_spec_validator import validate as validate_spec

    validate_spec(spec)  # an OpenAPI 3 document (its version's schema and rules), or raises
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_invocations(http: httpx.Client) -> None:
    chat = http.post("/invocations", json={"messages": CHAT, "max_tokens": 3})
    assert chat.status_code == 200
    validate("CreateChatCompletionResponse", chat.json())
    comp = http.post("/invocations", json={"prompt": "hi", "max_tokens": 3})
    assert comp.status_code == 200
    validate("CreateCompletionResponse", comp.json())
    err = error_of(http.post("/invocations", json={"input": "what"}), 400)
    assert err["message"].startswith("Cannot find suitable handler for request.")
    error_of(http.post("/invocations", content=b"{", headers={"Content-Type": "application/json"}),
             400)
