"""The OpenAI surface end to end: a real uvicorn server over a LocalBackend, the real openai
SDK and raw httpx; every JSON body and SSE chunk validated against the OpenAI OpenAPI schema."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.proxy.conftest import MODEL, sse_events
from tests.proxy.openapi_schema import COMPLETION_CHUNK, validate

CHAT = [{"role": "user", "content": "Say something about 世界 and 😀."}]


def chat_json(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **body})
    assert r.status_code == 200, r.text
    data = r.json()
    validate("CreateChatCompletionResponse", data)
    return data


def completion_json(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    data = r.json()
    validate("CreateCompletionResponse", data)
    return data


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """The events of a streamed request, each chunk validated; ends with [DONE]."""
    name = "CreateChatCompletionStreamResponse" if "chat" in path else COMPLETION_CHUNK
    with http.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        validate(name, e)
    return events[:-1]


def streamed_text(events: list[dict[str, Any]], chat: bool) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            piece = (c["delta"].get("content") or "") if chat else c["text"]
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def test_models(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    data = http.get("/v1/models").json()
    validate("ListModelsResponse", data)
    assert data["data"][0]["max_model_len"] == 2048


def test_chat_non_streaming(client: openai.OpenAI, http: httpx.Client) -> None:
    data = chat_json(http, max_tokens=8, temperature=0, ignore_eos=True)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 8
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 8
    sdk = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert sdk.choices[0].message.content == choice["message"]["content"]  # greedy: same text


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI, http: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 24, "temperature": 0.8, "seed": 7}
    whole = chat_json(http, **{k: v for k, v in body.items() if k != "messages"})
    events = stream(http, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_text(events, chat=True)[0] == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all("usage" not in e for e in events)  # only with include_usage
    sdk_text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0.8, seed=7, stream=True)
        if ch.choices)
    assert sdk_text == whole["choices"][0]["message"]["content"]


def test_completions_default_max_tokens_and_stream(client: openai.OpenAI, http: httpx.Client) -> None:
    data = completion_json(http, prompt="Once upon a time", ignore_eos=True, seed=1)
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["usage"]["completion_tokens"] == 16  # vLLM's default for completions
    events = stream(http, "/v1/completions", {"prompt": "Once upon a time", "ignore_eos": True,
                                              "seed": 1, "stream_options": {"include_usage": True}})
    assert streamed_text(events, chat=False)[0] == data["choices"][0]["text"]
    last = events[-1]
    assert last["choices"] == [] and last["usage"] == data["usage"]
    assert all("usage" not in e for e in events[:-1])
    sdk = client.completions.create(model=MODEL, prompt="Once upon a time", seed=1,
                                    extra_body={"ignore_eos": True})
    assert sdk.choices[0].text == data["choices"][0]["text"]


def test_chat_default_max_tokens_is_the_rest_of_the_context(http: httpx.Client) -> None:
    text = "word " * 2030
    n = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    room = 2048 - n["count"]
    assert 0 < room < 40, n["count"]
    data = chat_json(http, messages=[{"role": "user", "content": text}], ignore_eos=True,
                     temperature=0)
    assert data["usage"]["prompt_tokens"] == n["count"]
    assert data["usage"]["completion_tokens"] == room
    assert data["choices"][0]["finish_reason"] == "length"


def test_n_choices(client: openai.OpenAI, http: httpx.Client) -> None:
    data = completion_json(http, prompt="Colors:", n=3, max_tokens=12, seed=3, ignore_eos=True)
    assert sorted(c["index"] for c in data["choices"]) == [0, 1, 2]
    assert len({c["text"] for c in data["choices"]}) > 1  # different draws per choice
    assert data["usage"]["completion_tokens"] == 36
    events = stream(http, "/v1/chat/completions", {"messages": CHAT, "n": 2, "max_tokens": 10,
                                                    "seed": 3})
    texts = streamed_text(events, chat=True)
    assert sorted(texts) == [0, 1]
    finished = {c["index"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert finished == {0, 1}
    sdk = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=10, seed=3)
    assert {c.index: c.message.content for c in sdk.choices} == texts


def test_chat_logprobs(client: openai.OpenAI, http: httpx.Client) -> None:
    data = chat_json(http, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0,
                     ignore_eos=True, return_token_ids=True)
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert entry["token"] == tops[0]["token"]  # greedy: the sampled token is the top one
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    events = stream(http, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6,
                                                    "logprobs": True, "top_logprobs": 3,
                                                    "temperature": 0, "ignore_eos": True})
    streamed = [x for e in events for c in e["choices"] if c.get("logprobs")
                for x in c["logprobs"]["content"]]
    assert streamed == content
    sdk = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, logprobs=True,
                                         top_logprobs=0, temperature=0)
    assert all(e.top_logprobs == [] for e in sdk.choices[0].logprobs.content)
    # the bytes of all tokens, joined, are the text
    raw = b"".join(bytes(e["bytes"]) for e in content)
    assert raw.decode("utf-8", "replace") == data["choices"][0]["message"]["content"]


def test_completion_logprobs(http: httpx.Client) -> None:
    data = completion_json(http, prompt="Numbers", max_tokens=5, logprobs=2, ignore_eos=True,
                           seed=5)
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(2 <= len(t) <= 3 for t in lp["top_logprobs"])  # top 2 and the sampled token
    assert lp["text_offset"][0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:],
                                                  lp["tokens"]))
    events = stream(http, "/v1/completions", {"prompt": "Numbers", "max_tokens": 5,
                                              "logprobs": 2, "ignore_eos": True, "seed": 5})
    assert [t for e in events for c in e["choices"] if c["logprobs"]
            for t in c["logprobs"]["text_offset"]] == lp["text_offset"]


def test_stop_strings(client: openai.OpenAI, http: httpx.Client) -> None:
    base = completion_json(http, prompt="The story:", max_tokens=40, temperature=0,
                           ignore_eos=True, return_token_ids=True)["choices"][0]
    text, ids = base["text"], base["token_ids"]
    # a stop string that really occurs, away from the start, without replacement characters
    start = next(i for i in range(8, len(text) - 4) if "\ufffd" not in text[i:i + 3]
                 and text[i:i + 3].strip())
    stop = text[start:start + 3]
    cut = text.index(stop)
    for streamed in (False, True):
        body = {"prompt": "The story:", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stop": [stop, "never-appears"], "return_token_ids": True}
        if streamed:
            events = stream(http, "/v1/completions", {**body, "stream_options":
                                                      {"include_usage": True}})
            got = streamed_text(events, chat=False)[0]
            final = next(c for e in events for c in e["choices"] if c["finish_reason"])
            num_tokens = events[-1]["usage"]["completion_tokens"]
        else:
            data = completion_json(http, **body)
            final = data["choices"][0]
            got, num_tokens = final["text"], data["usage"]["completion_tokens"]
        assert got == text[:cut]
        assert final["finish_reason"] == "stop" and final["stop_reason"] == stop
        # usage counts the token that completed the stop string, and nothing after it
        def detok(ids: list[int]) -> str:
            return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]

        assert stop in detok(ids[:num_tokens]) and stop not in detok(ids[:num_tokens - 1])
    data = completion_json(http, prompt="The story:", max_tokens=40, temperature=0,
                           ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert data["choices"][0]["text"] == text[:cut + len(stop)]
    sdk = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, temperature=0,
                                         stop=["\n", " "])
    assert "\n" not in sdk.choices[0].message.content


def test_stop_token_ids_report_the_token(http: httpx.Client) -> None:
    base = completion_json(http, prompt="Go", max_tokens=10, temperature=0, ignore_eos=True,
                           return_token_ids=True)["choices"][0]["token_ids"]
    data = completion_json(http, prompt="Go", max_tokens=10, temperature=0,
                           stop_token_ids=[base[3]])
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == base[3]
    assert data["usage"]["completion_tokens"] == base.index(base[3]) + 1


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def run(seed: int | None) -> str:
        r = client.completions.create(model=MODEL, prompt="Random:", max_tokens=16,
                                      temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].text

    assert run(42) == run(42)
    assert len({run(42), run(43), run(None), run(None)}) >= 3


def test_request_id_header(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                  headers={"X-Request-Id": "my-trace-123"})
    assert r.headers["x-request-id"] == "my-trace-123"
    assert r.json()["id"] == "cmpl-my-trace-123"
    r = http.get("/health")
    assert len(r.headers["x-request-id"]) == 32  # a fresh uuid4 hex


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_fields_are_ignored(http: httpx.Client, path: str) -> None:
    body = {"model": MODEL, "max_tokens": 2, "some_future_field": {"x": 1}, "user": "u1",
            "messages": CHAT} if "chat" in path else {"model": MODEL, "max_tokens": 2,
                                                      "prompt": "hi", "some_future_field": 1}
    assert http.post(path, json=body).status_code == 200


def test_completion_prompt_forms(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    a = completion_json(http, prompt="Hello there", max_tokens=4, temperature=0)
    b = completion_json(http, prompt=ids, max_tokens=4, temperature=0)
    c = completion_json(http, prompt=["Hello there"], max_tokens=4, temperature=0)
    d = completion_json(http, prompt=[ids], max_tokens=4, temperature=0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == c["choices"][0]["text"] \
        == d["choices"][0]["text"]
    e = completion_json(http, prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    assert e["choices"][0]["text"] == "Hello there" + a["choices"][0]["text"]


def test_allowed_token_ids_restrict_every_draw(http: httpx.Client) -> None:
    allowed = list(range(300, 340))
    for temperature in (0.0, 1.0):
        r = completion_json(http, prompt="Hello there", max_tokens=12, temperature=temperature,
                            seed=5, allowed_token_ids=allowed, ignore_eos=True,
                            return_token_ids=True)
        ids = r["choices"][0]["token_ids"]
        assert len(ids) == 12 and set(ids) <= set(allowed), ids
    bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                             "allowed_token_ids": [1, 10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "allowed_token_ids"


def test_truncate_prompt_tokens_keeps_the_last_tokens(http: httpx.Client) -> None:
    ids = list(range(100, 140))
    cut = completion_json(http, prompt=ids, max_tokens=6, temperature=0,
                          truncate_prompt_tokens=8, return_token_ids=True)
    last = completion_json(http, prompt=ids[-8:], max_tokens=6, temperature=0,
                           return_token_ids=True)
    assert cut["usage"]["prompt_tokens"] == 8
    assert cut["choices"][0]["token_ids"] == last["choices"][0]["token_ids"]
    whole = completion_json(http, prompt=ids, max_tokens=2, truncate_prompt_tokens=-1)
    assert whole["usage"]["prompt_tokens"] == 40  # -1: the model's length, which it fits


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"bad_words": ["foo"]}, "bad_words"),
    ("/v1/completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search"),
])
def test_vllm_fields_not_implemented_are_refused_by_name(http: httpx.Client, path: str,
                                                         extra: dict, param: str) -> None:
    body = {"model": MODEL, "max_tokens": 2, **extra,
            **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    r = http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
