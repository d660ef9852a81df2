"""Issue 20's surface over a LocalBackend (the built-in model): prompt logprobs (vLLM's
`prompt_logprobs`; completions echo + logprobs, with max_tokens 0 as lm-eval sends it),
batched completion prompts, logit_bias, continuous usage stats and chat echo. Every body
and chunk is validated against OpenAI's OpenAPI description."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest

from tests.proxy.test_openai_api import CHAT, completion_json, stream, streamed_text

pytestmark = pytest.mark.timeout(120)
IDS = [101, 7, 99, 1500, 42, 8, 256, 3000, 77, 5]


def test_echo_with_logprobs_returns_the_prompts_logprobs(http: httpx.Client) -> None:
    """max_tokens 0 + echo + logprobs: the prompt alone, one entry per prompt token, the
    first null; the same values as the prompt part of a max_tokens 1 answer and as vLLM's
    prompt_logprobs field."""
    zero = completion_json(http, prompt=IDS, max_tokens=0, echo=True, logprobs=2)
    (c,) = zero["choices"]
    lps = c["logprobs"]
    assert zero["usage"]["completion_tokens"] == 0 and c["finish_reason"] == "length"
    assert len(lps["tokens"]) == len(IDS) and lps["token_logprobs"][0] is None
    assert lps["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lps["token_logprobs"][1:])
    # each position: the prompt token's own entry and the top 2 (3 when it is not among them)
    assert all(2 <= len(t) <= 3 for t in lps["top_logprobs"][1:])
    assert c["text"] == http.post("/detokenize", json={"tokens": IDS}).json()["prompt"]
    one = completion_json(http, prompt=IDS, max_tokens=1, echo=True, logprobs=2, temperature=0,
                          prompt_logprobs=2)
    (c1,) = one["choices"]
    assert len(c1["logprobs"]["tokens"]) == len(IDS) + 1
    for a, b in zip(lps["token_logprobs"][1:], c1["logprobs"]["token_logprobs"][1:len(IDS)]):
        assert math.isclose(a, b, abs_tol=1e-5)
    plp = c1["prompt_logprobs"]  # vLLM's field: token id -> {logprob, rank, decoded_token}
    assert plp[0] is None and len(plp) == len(IDS)
    for i, entry in enumerate(plp[1:], start=1):
        own = entry[str(IDS[i])]
        assert math.isclose(own["logprob"], lps["token_logprobs"][i], abs_tol=1e-5)
        assert own["rank"] >= 1 and isinstance(own["decoded_token"], str)
    # streamed: the first chunk carries the prompt and its logprobs
    events = stream(http, "/v1/completions", {"prompt": IDS, "max_tokens": 2, "echo": True,
                                              "logprobs": 1, "temperature": 0})
    first = events[0]["choices"][0]["logprobs"]
    assert len(first["tokens"]) == len(IDS) and first["token_logprobs"][0] is None
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events
               if e["choices"] and e["choices"][0]["logprobs"]) == len(IDS) + 2


def test_chat_prompt_logprobs_in_the_body(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    n = body["usage"]["prompt_tokens"]
    assert len(body["prompt_logprobs"]) == n and body["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])


def test_max_tokens_zero_needs_echo(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("streamed", [False, True])
def test_batched_prompts_index_choices_as_vllm(http: httpx.Client, streamed: bool) -> None:
    """Prompt i's choice j is index i*n + j, each equal to that prompt sent alone (same
    seed); usage sums the prompts."""
    prompts = ["The sky", "A long time ago in a", "Once"]
    body = {"max_tokens": 5, "n": 2, "seed": 11, "temperature": 1.0}
    alone = [completion_json(http, prompt=p, **body) for p in prompts]
    want = {i * 2 + c["index"]: c["text"] for i, a in enumerate(alone) for c in a["choices"]}
    if streamed:
        events = stream(http, "/v1/completions", {"prompt": prompts, **body,
                                                  "stream_options": {"include_usage": True}})
        got = streamed_text([e for e in events if e["choices"]], chat=False)
        use = events[-1]["usage"]
    else:
        data = completion_json(http, prompt=prompts, **body)
        got = {c["index"]: c["text"] for c in data["choices"]}
        assert [c["index"] for c in data["choices"]] == list(range(6))
        use = data["usage"]
    assert got == want
    assert use["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert use["completion_tokens"] == 30


def test_batched_prompts_through_the_sdk_with_echo(client: openai.OpenAI) -> None:
    out = client.completions.create(model="pdserve-builtin-tiny", prompt=["one", "two"],
                                    max_tokens=3, echo=True, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("one") and out.choices[1].text.startswith("two")


def test_logit_bias_forces_and_forbids_tokens(http: httpx.Client) -> None:
    forced = completion_json(http, prompt="hello", max_tokens=6, temperature=0.9, seed=1,
                             logit_bias={"321": 100}, return_token_ids=True)
    assert forced["choices"][0]["token_ids"] == [321] * 6
    plain = completion_json(http, prompt="hello", max_tokens=6, temperature=0,
                            return_token_ids=True)["choices"][0]["token_ids"]
    banned = completion_json(http, prompt="hello", max_tokens=6, temperature=0,
                             logit_bias={str(plain[0]): -100}, return_token_ids=True)
    assert banned["choices"][0]["token_ids"][0] != plain[0]


def test_continuous_usage_stats_count_up_in_every_chunk(http: httpx.Client) -> None:
    events = stream(http, "/v1/completions", {
        "prompt": "count", "max_tokens": 5, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    with_choices = [e for e in events if e["choices"]]
    counts = [e["usage"]["completion_tokens"] for e in with_choices]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(e["usage"]["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"]
               for e in with_choices)


@pytest.mark.parametrize("streamed", [False, True])
def test_chat_echo_starts_with_the_assistants_last_message(http: httpx.Client,
                                                           streamed: bool) -> None:
    msgs: list[dict[str, Any]] = [*CHAT, {"role": "assistant", "content": "Well, "}]
    body = {"messages": msgs, "max_tokens": 3, "echo": True, "add_generation_prompt": False,
            "continue_final_message": True}
    if streamed:
        events = stream(http, "/v1/chat/completions", body)
        text = streamed_text(events, chat=True)[0]
    else:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
    assert text.startswith("Well, ") and len(text) > len("Well, ")
    # the last message is the user's: nothing to echo
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "echo": True,
                                                "temperature": 0})
    plain = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                    "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == \
        plain.json()["choices"][0]["message"]["content"]
