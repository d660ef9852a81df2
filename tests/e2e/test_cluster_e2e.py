"""The whole product end to end on CPU: real worker processes behind a real `pdserve serve`
process, driven by the official `openai` SDK. Outputs equal the offline engine; responses
validate against OpenAI's schemas; errors arrive as the SDK's exception types; bad input
never gets a 5xx or a hang. Workers killed and frozen under load: `test_faults.py`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.proxy.openapi_schema import require_spec, validate
from tests.workers.cluster import (
    TOKEN,
    free_port_block,
    start_worker,
    stop_workers,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(900)
KEY = "sk-test"


def start_proxy(tmp, prefill, decode, *extra):
    port = free_port_block(1)
    log = tmp / f"proxy-{port}.log"
    env = {**os.environ, "PDSERVE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "pdserve", "serve", "--port", str(port), "--internal-token",
           TOKEN, "--api-key", KEY, "--health-interval", "0.5", "--min-pd-prompt-tokens", "0"]
    for u in prefill:
        cmd += ["--prefill", u]
    for u in decode:
        cmd += ["--decode", u]
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, *extra], stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            proc.kill()  # never leave a proxy behind
            proc.wait(10)
            raise TimeoutError(log.read_text()[-3000:])
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cache = tmp / "cache"
    env = {"PDSERVE_CACHE_DIR": str(cache)}
    os.environ["PDSERVE_CACHE_DIR"] = str(cache)
    args = ("--transfer-timeout", "3")
    ws = [start_worker("prefill", tmp, *args, env=env), start_worker("prefill", tmp, *args, env=env),
          start_worker("decode", tmp, *args, env=env), start_worker("decode", tmp, *args, env=env)]
    proc = None
    try:
        wait_healthy(ws)
        proc, url, log = start_proxy(tmp, [w.http for w in ws[:2]], [w.http for w in ws[2:]])
        yield {"P": ws[:2], "D": ws[2:], "url": url, "proc": proc, "log": log, "tmp": tmp}
    finally:
        stop_all(proc, ws)


def stop_all(proxy, workers):
    if proxy is not None:
        proxy.terminate()
        proxy.wait(20)
    stop_workers(workers)


@pytest.fixture(scope="module")
def reference(cluster):
    return LLM(None, use_tqdm_on_load=False, max_model_len=512, num_gpu_blocks_override=400)


@pytest.fixture
def client(cluster):
    with openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY, max_retries=0,
                       timeout=120) as c:
        yield c


def model_name(client):
    return client.models.list().data[0].id


def prompt_ids(i, n=40):
    import random

    rng = random.Random(i)
    return [rng.randrange(5, 4000) for _ in range(rng.randrange(8, n))]


def test_completions_equal_offline_and_validate(client, reference):
    require_spec()
    model = model_name(client)
    tok = reference.tokenizer
    for i, (temp, seed) in enumerate([(0.0, None), (0.8, 11), (1.0, 12)]):
        ids = prompt_ids(i)
        params = SamplingParams(temperature=temp, seed=seed if seed is not None else 0,
                                max_tokens=12, ignore_eos=True)
        want = reference.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        extra = {"ignore_eos": True, "return_token_ids": True}
        r = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=temp,
                                      seed=seed if seed is not None else 0, extra_body=extra)
        body = r.model_dump(exclude_unset=True)
        validate("CreateCompletionResponse", body)
        assert body["choices"][0]["token_ids"] == want.outputs[0].token_ids
        assert r.choices[0].text == tok.decode(want.outputs[0].token_ids)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
        # streaming: the same text, chunk by chunk, and the usage chunk
        stream = client.completions.create(
            model=model, prompt=ids, max_tokens=12, temperature=temp,
            seed=seed if seed is not None else 0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        assert text == tok.decode(want.outputs[0].token_ids)
        assert usage.completion_tokens == 12


def test_chat_streaming_and_not(client):
    require_spec()
    model = model_name(client)
    msgs = [{"role": "user", "content": "Héllo, 世界! 🙂 Tell me a story."}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, seed=3,
                                       temperature=0.9, n=2)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    assert len(r.choices) == 2 and r.usage.completion_tokens == sum(
        1 for _ in range(0)) + r.usage.completion_tokens
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, seed=3,
                                            temperature=0.9, n=2, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in r.choices}


def test_stop_string_split_across_tokens(client, reference):
    model = model_name(client)
    ids = prompt_ids(50)
    r = client.completions.create(model=model, prompt=ids, max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = r.choices[0].text
    # a stop string that straddles a token boundary: the last 2 chars of token 3's text plus
    # the first 2 chars of token 4's text, if the text is long enough
    toks = reference.generate({"prompt_token_ids": ids}, SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    tok = reference.tokenizer
    cut = len(tok.decode(toks[:6]))
    stop = text[cut - 2:cut + 2]
    assert len(stop) == 4
    r2 = client.completions.create(model=model, prompt=ids, max_tokens=30, temperature=0,
                                   stop=[stop], extra_body={"ignore_eos": True})
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].text == text[: text.index(stop)]


def test_sdk_exception_types(cluster, client):
    model = model_name(client)
    with openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=2, top_p=7)
    assert "top_p" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[5] * 600, max_tokens=2)


BAD_BODIES = [
    b"{not json",
    b"[]",
    json.dumps({"model": "M", "prompt": 5}).encode(),
    json.dumps({"model": "M", "prompt": "x", "max_tokens": -3}).encode(),
    json.dumps({"model": "M", "prompt": "x", "max_tokens": 10**9}).encode(),
    json.dumps({"model": "M", "prompt": "x", "max_tokens": "ten"}).encode(),
    json.dumps({"model": "M", "messages": []}).encode(),
    json.dumps({"model": "M", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
    json.dumps({"model": "M", "messages": [{"content": "x"}]}).encode(),
    json.dumps({"model": "M", "prompt": [1, 2, 10**9]}).encode(),
    json.dumps({"model": "M", "prompt": [-1]}).encode(),
    json.dumps({"model": "M", "prompt": "x" * (1 << 20)}).encode(),
    b'{"model": "M", "prompt": "\xff\xfe bad utf8"}',
    json.dumps({"model": "M", "prompt": "x", "n": 0}).encode(),
    json.dumps({"model": "M", "prompt": "x", "temperature": -1}).encode(),
    json.dumps({"model": "M", "prompt": "x", "logprobs": 50}).encode(),
    json.dumps({"model": "M", "prompt": "x", "stop": 5}).encode(),
    # the fault campaign's 500s and worker crashes (issue 13)
    json.dumps({"model": "M", "prompt": "a\ud800b"}).encode(),
    json.dumps({"model": "M", "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
    b'{"model": "M", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    json.dumps({"model": "M", "prompt": "x", "stop_token_ids": [2**64]}).encode(),
    json.dumps({"model": "M", "prompt": "x", "stop_token_ids": [5000], "min_tokens": 2}).encode(),
    json.dumps({"model": "M", "prompt": "x", "stop": ["s"] * 100}).encode(),
    json.dumps({"model": "M", "prompt": "x", "top_k": 10**30}).encode(),
    json.dumps({"model": "M", "prompt": "x", "priority": 10**30}).encode(),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_input_sweep_gets_4xx_json(cluster, client, path):
    model = model_name(client)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=cluster["url"], timeout=30, headers=headers) as http:
        for body in BAD_BODIES:
            body = body.replace(b'"M"', json.dumps(model).encode())
            r = http.post(path, content=body)
            assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["message"] and err["type"]
        r = http.post(path, content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code in (400, 415)
    # and it keeps serving
    assert client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3).choices


def test_the_poison_request_gets_a_400_and_every_worker_lives(cluster, client):
    """stop_token_ids outside the vocabulary with min_tokens killed both D (or both P) once:
    the proxy's validator refuses it, the workers would too, and the cluster serves on."""
    model = model_name(client)
    for prompt in ([5, 6, 7, 8] * 2, [5, 6, 7] * 14):  # under and over min-pd-prompt-tokens
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                      extra_body={"stop_token_ids": [5000], "min_tokens": 2})
        assert e.value.body["param"] == "stop_token_ids" and "5000" in e.value.body["message"]
    for w in cluster["P"] + cluster["D"]:
        assert w.get("/health").status_code == 200
    assert client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3).choices
    r = httpx.post(cluster["url"] + "/tokenize", content=json.dumps({"prompt": "\ud800"}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_denormal_temperature_samples_at_the_minimum(client):
    """temperature 1e-300 used to emit token 0 every step; it is raised to 0.01 (vLLM)."""
    model = model_name(client)
    kw = dict(model=model, prompt=prompt_ids(5), max_tokens=8, seed=3,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    tiny = client.completions.create(temperature=1e-300, **kw).model_dump()
    low = client.completions.create(temperature=0.01, **kw).model_dump()
    assert tiny["choices"][0]["token_ids"] == low["choices"][0]["token_ids"]
    assert tiny["choices"][0]["token_ids"] != [0] * 8


def test_the_proxys_view_of_p_is_fresh_after_the_transfer(cluster, client):
    """P's FIRST report still counts the prompt's blocks as awaiting transfer; the TRANSFER
    report (and the ping answers) bring the proxy the load after they were freed: an idle
    cluster's /health shows no P holding blocks (it used to keep the FIRST numbers for good)."""
    model = model_name(client)
    for i in range(4):
        client.completions.create(model=model, prompt=prompt_ids(300 + i, 60), max_tokens=4)

    def p_loads():
        health = httpx.get(cluster["url"] + "/health", timeout=5).json()
        return [w["load"] for w in health["workers"] if w["role"] == "prefill"]

    end = time.monotonic() + 10
    while True:
        loads = p_loads()
        if loads and all(ld.get("blocks_awaiting_transfer") == 0 and ld.get(
                "kv_cache_usage_perc", 1) < 1 and ld.get("num_requests_running") == 0
                for ld in loads):
            break
        assert time.monotonic() < end, loads
        time.sleep(0.1)
    assert any("blocks_awaiting_transfer" in ld for ld in loads)  # P reported, not empty


# ---- structured outputs, through P then D (the built-in model's random weights: only the
# grammar makes the text valid) -----------------------------------------------------------

PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                   "age": {"type": "integer", "minimum": 0,
                                                           "maximum": 99}},
                  "required": ["city", "age"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "kind", "owner", "tags"],
    "additionalProperties": False,
}


def test_sdk_parse_returns_a_parsed_object(client):
    """The openai SDK's chat.completions.parse with a pydantic model (response_format
    json_schema, strict): the proxy constrains P's first token and D's rest."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    class Owner(BaseModel):
        city: str = Field(max_length=10)
        verified: bool

    class Pet(BaseModel):
        name: str = Field(max_length=12)
        kind: Literal["cat", "dog", "fox"]
        owner: Owner
        tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)

    # random weights: every string is bounded, or one could run to max_tokens
    r = client.chat.completions.parse(
        model=model_name(client), messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet, max_tokens=400, temperature=0.9, seed=5, n=2)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(c.message.parsed, Pet), c.message.content


def test_json_schema_streamed_and_not(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA,
                                                  "strict": True}}
    msgs = [{"role": "user", "content": "A pet, as JSON."}]
    r = client.chat.completions.create(model=model_name(client), messages=msgs, max_tokens=250,
                                       response_format=fmt, temperature=1.0, seed=9)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    jsonschema.validate(json.loads(r.choices[0].message.content), PET_SCHEMA)
    stream = client.chat.completions.create(model=model_name(client), messages=msgs,
                                            max_tokens=250, response_format=fmt,
                                            temperature=1.0, seed=9, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content  # seeded: the same draws, streamed


def test_vllm_constraint_fields(client):
    model = model_name(client)
    got = client.completions.create(model=model, prompt="Answer:", max_tokens=10, n=3,
                                    temperature=1.0, seed=2,
                                    extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert all(c.text in ("yes", "no", "maybe") for c in got.choices)
    got = client.completions.create(model=model, prompt="Code:", max_tokens=12, temperature=1.0,
                                    seed=2, extra_body={"structured_outputs":
                                                        {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", got.choices[0].text), got.choices[0].text
    # vLLM's allowed_token_ids, on P's first token and D's rest
    got = client.completions.create(model=model, prompt=prompt_ids(5), max_tokens=10,
                                    temperature=1.0, seed=3, extra_body={
                                        "allowed_token_ids": [7, 8, 9], "ignore_eos": True,
                                        "return_token_ids": True})
    assert set(got.choices[0].model_extra["token_ids"]) <= {7, 8, 9}
    # any JSON object: its keys and strings are unbounded, so random weights mostly run to
    # max_tokens inside one; each choice opens an object, and those that end are objects
    r = client.chat.completions.create(model=model, max_tokens=300, temperature=0.5, seed=1,
                                       n=4, messages=[{"role": "user", "content": "JSON."}],
                                       response_format={"type": "json_object"})
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.message.content.startswith('{"'), c.message.content[:80]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": {"type": "nope"}}}},
     "response_format"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
])
def test_a_bad_constraint_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name(client), max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}],
                                       extra_body=extra)
    assert e.value.body["param"] == param


# ---- tool calling, through P then D ------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


def _sdk_calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_tool_calls_through_the_sdk(client, stream):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    model = model_name(client)
    for choice, finish in (({"type": "function", "function": {"name": "get_weather"}}, "stop"),
                           ("required", "tool_calls")):
        kw = dict(model=model, messages=msgs, tools=[WEATHER_TOOL, TIME_TOOL],
                  tool_choice=choice, max_tokens=300, temperature=0.8, seed=4)
        if stream:
            # the SDK's stream helper assembles tool_calls deltas into the final message
            with client.chat.completions.stream(**kw) as s:
                for event in s:
                    if event.type == "chunk":
                        validate("CreateChatCompletionStreamResponse",
                                 event.chunk.model_dump(exclude_unset=True))
                r = s.get_final_completion()
        else:
            r = client.chat.completions.create(**kw)
            validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
        c = r.choices[0]
        assert c.finish_reason == finish, c.message
        calls = _sdk_calls(c.message)
        assert calls and c.message.content in (None, "")
        for name, args in calls:
            assert name in ("get_weather", "get_time")
            if name == "get_weather":
                assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
            else:
                assert args["zone"] in ("UTC", "CET")
        if isinstance(choice, dict):
            assert [n for n, _ in calls] == ["get_weather"]


def test_a_tool_result_conversation_renders(client):
    """The assistant's call and the tool's result (tool_call_id) go back through the chat
    template; auto tool choice on a server without a parser is a 400 naming it."""
    model = model_name(client)
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]
    r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_TOOL],
                                       tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_TOOL],
                                       max_tokens=5)
    assert e.value.body["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in e.value.body["message"]


def test_json_schema_through_a_both_role_worker(cluster):
    """The same constraint served by one both-role worker (no P/D split): valid JSON, and
    the seeded text equals the P/D cluster's."""
    import jsonschema

    tmp = cluster["tmp"]
    w = start_worker("both", tmp, env={"PDSERVE_CACHE_DIR": str(tmp / "cache")})
    proc = None
    try:
        wait_healthy([w])
        proc, url, _ = start_proxy(tmp, [], [], "--worker", w.http)
        fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}
        kw = dict(messages=[{"role": "user", "content": "A pet, as JSON."}], max_tokens=250,
                  response_format=fmt, temperature=1.0, seed=9)
        texts = []
        for base in (url, cluster["url"]):
            with openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0,
                               timeout=120) as c:
                texts.append(c.chat.completions.create(model=model_name(c), **kw)
                             .choices[0].message.content)
        jsonschema.validate(json.loads(texts[0]), PET_SCHEMA)
        assert texts[0] == texts[1]
    finally:
        stop_all(proc, [w])


def test_langchain_structured_output_and_tools(cluster):
    """LangChain's ChatOpenAI against the cluster: with_structured_output (a pydantic model,
    response_format json_schema) and bind_tools with a named tool choice."""
    from typing import Annotated, Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=10)
        kind: Literal["cat", "dog", "fox"]
        legs: int = Field(ge=0, le=8)
        tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)

    with openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY) as c:
        model = model_name(c)
    llm = ChatOpenAI(base_url=cluster["url"] + "/v1", api_key=KEY, model=model,
                     temperature=0.9, max_tokens=300, seed=3, max_retries=0, timeout=120)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet)

    class GetWeather(BaseModel):
        """The weather in a city."""

        city: str = Field(max_length=10)
        unit: Literal["celsius", "fahrenheit"]

    # strict: no properties beyond the model's (random weights would otherwise add keys
    # until max_tokens, as the schema allows)
    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True).invoke(
        "Weather in Oslo?")
    assert [tc["name"] for tc in msg.tool_calls] == ["GetWeather"], (msg, msg.invalid_tool_calls)
    assert set(msg.tool_calls[0]["args"]) == {"city", "unit"}


def proxy_counter(cluster, name, **labels):
    """A counter of the proxy's /metrics (0 when the series does not exist yet)."""
    text = httpx.get(cluster["url"] + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def hf_reference(cluster):
    """transformers' model of the served checkpoint (the built-in one), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from pdserve.engine.builtin_model import builtin_model_path

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(
        builtin_model_path(), dtype=torch.float32, local_files_only=True).eval()


def hf_logprobs(model, ids):
    """transformers' log-softmax of each prompt token given the ones before ([len - 1])."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_loglikelihoods_as_lm_eval_asks_equal_transformers(cluster, client, hf_reference):
    """lm-eval's local-completions request (token-id prompts in a batch, echo, logprobs 1,
    max_tokens 1, temperature 0), and max_tokens 0: every prompt token's logprob equals
    transformers' within 1e-4; such requests are served by P alone (route p_only)."""
    model = model_name(client)
    prompts = [prompt_ids(100 + i, 60) for i in range(3)]
    before = proxy_counter(cluster, "pdserve_proxy_routing_decisions_total", route="p_only")
    one = client.completions.create(model=model, prompt=prompts, max_tokens=1, logprobs=1,
                                    echo=True, temperature=0, seed=1234)
    zero = client.completions.create(model=model, prompt=prompts, max_tokens=0, logprobs=1,
                                     echo=True)
    assert proxy_counter(cluster, "pdserve_proxy_routing_decisions_total",
                         route="p_only") - before == 6
    worst = 0.0
    for i, ids in enumerate(prompts):
        want = hf_logprobs(hf_reference, ids)
        for out, extra in ((one, 1), (zero, 0)):
            lps = out.choices[i].logprobs
            assert out.choices[i].index == i
            assert len(lps.token_logprobs) == len(ids) + extra
            assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
            worst = max(worst, max(abs(a - b) for a, b in
                                   zip(lps.token_logprobs[1:len(ids)], want, strict=True)))
    assert worst <= 1e-4, f"max |logprob - transformers'| = {worst:.2e}"
    assert zero.usage.completion_tokens == 0 and one.usage.completion_tokens == 3
    assert zero.usage.prompt_tokens == sum(len(p) for p in prompts)


def test_prompt_logprobs_of_a_request_that_p_hands_to_d(cluster, client, hf_reference,
                                                        reference):
    """vLLM's prompt_logprobs on a P/D request: P computes them (transformers' values), D
    continues the output exactly as the offline engine does."""
    ids = prompt_ids(200, 80)
    r = httpx.post(cluster["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": model_name(client), "prompt": ids, "max_tokens": 6,
                         "temperature": 0, "prompt_logprobs": 2, "return_token_ids": True},
                   timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    plp = choice["prompt_logprobs"]
    want = hf_logprobs(hf_reference, ids)
    assert plp[0] is None and len(plp) == len(ids)
    assert max(abs(plp[k + 1][str(ids[k + 1])]["logprob"] - want[k])
               for k in range(len(ids) - 1)) <= 1e-4
    offline = reference.generate({"prompt_token_ids": ids},
                                 SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert choice["token_ids"] == offline.outputs[0].token_ids


def test_langchain_batch_of_five_prompts(cluster):
    """LangChain's OpenAI (completions) LLM packs a batch into one request's prompt list."""
    from langchain_openai import OpenAI

    with openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY) as c:
        model = model_name(c)
    llm = OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY, model=model, temperature=0,
                 max_tokens=8, max_retries=0, timeout=120)
    prompts = ["The sky is", "Once upon a", "In the beginning", "Hello, my name", "2 + 2 ="]
    batch = llm.batch(prompts)
    assert len(batch) == 5 and all(isinstance(t, str) and t for t in batch)
    assert batch == [llm.invoke(p) for p in prompts]


def test_slo_placement_routes_by_measured_costs_and_outputs_match(cluster, reference):
    """A second proxy over the same workers with --placement slo: once the workers have
    measured their steps, each request's placement comes from the estimates (counted by
    route and reason), and outputs equal the offline engine wherever they ran."""
    proc, url, _ = start_proxy(cluster["tmp"], [w.http for w in cluster["P"]],
                               [w.http for w in cluster["D"]], "--placement", "slo")
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                           timeout=120) as c:
            model = model_name(c)
            for i in range(6):
                ids = prompt_ids(300 + i, 120)
                out = c.completions.create(model=model, prompt=ids, max_tokens=4,
                                           temperature=0, extra_body={"return_token_ids": True})
                want = reference.generate({"prompt_token_ids": ids},
                                          SamplingParams(max_tokens=4, temperature=0),
                                          use_tqdm=False)[0].outputs[0].token_ids
                assert out.choices[0].model_extra["token_ids"] == want
        text = httpx.get(url + "/metrics", timeout=10).text
        decided = [line for line in text.splitlines()
                   if line.startswith("pdserve_proxy_placement_decisions_total{")]
        assert decided and sum(float(x.rsplit(" ", 1)[1]) for x in decided) == 6, decided
        # the workers served traffic before (this module's tests): their steps are measured
        assert any('reason="slo"' in x for x in decided), decided
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_mixed_pool_runs_p_d_from_a_p_to_a_both_role_worker(cluster, reference):
    """A P and a both-role worker (flexible roles, issue 21): the both-role worker takes the
    P's KV as a D does for long prompts and prefills short ones itself; every output equals
    the offline engine's."""
    tmp = cluster["tmp"]
    w = start_worker("both", tmp, "--transfer-timeout", "3",
                     env={"PDSERVE_CACHE_DIR": str(tmp / "cache")})
    proc = None
    try:
        wait_healthy([w])
        assert "kv_address" in w.get("/info").json()
        proc, url, _ = start_proxy(tmp, [cluster["P"][0].http], [], "--worker", w.http,
                                   "--min-pd-prompt-tokens", "16")
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["serves"] == "prefill/decode: 1 P + 1 both-role as D", health
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                           timeout=120) as c:
            model = model_name(c)
            # three prompts of 16+ tokens (P, then the both-role worker), one of 6 (itself)
            prompts = [list(range(100, 180)), [7, 8, 9, 10, 11, 12], list(range(500, 620)),
                       list(range(900, 940))]
            for ids, temp, seed in zip(prompts, (0.0, 0.0, 0.9, 1.0), (None, None, 21, 22)):
                out = c.completions.create(model=model, prompt=ids, max_tokens=6,
                                           temperature=temp, seed=seed,
                                           extra_body={"return_token_ids": True})
                want = reference.generate({"prompt_token_ids": ids}, SamplingParams(
                    max_tokens=6, temperature=temp, seed=seed), use_tqdm=False)[0]
                assert out.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids
        text = httpx.get(url + "/metrics", timeout=10).text
        routes = {line.split('route="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines()
                  if line.startswith("pdserve_proxy_routing_decisions_total{")}
        assert routes.get("pd") == 3 and routes.get("skip_p") == 1, routes
    finally:
        stop_all(proc, [w])


def test_two_both_role_workers_pair_up_through_the_proxy(cluster, reference):
    """Flexible roles through `pdserve serve --placement slo` (issue 21): two both-role
    workers, an ITL bound no running stream can meet (0.01 ms), so a prompt arriving while
    one worker runs a stream is prefilled on the other, idle one and its KV handed over; that
    worker then keeps P's role (the proxy's gauge says so) and the next pair goes the same
    way. Every output equals the offline engine's. (A both-role worker acting as P for one
    request and D for another in one run: tests/workers/test_pd_workers.py.)"""
    import threading

    tmp = cluster["tmp"]
    ws = [start_worker("both", tmp, "--transfer-timeout", "3",
                       env={"PDSERVE_CACHE_DIR": str(tmp / "cache")}) for _ in range(2)]
    proc = None
    try:
        wait_healthy(ws)
        proc, url, _ = start_proxy(tmp, [], [], "--worker", ws[0].http, "--worker", ws[1].http,
                                   "--placement", "slo", "--slo-itl-ms", "0.01")
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                           timeout=120) as c:
            model = model_name(c)

            def check(ids, max_tokens, got):
                want = reference.generate({"prompt_token_ids": ids}, SamplingParams(
                    max_tokens=max_tokens, temperature=0, ignore_eos=True),
                    use_tqdm=False)[0].outputs[0].token_ids
                assert got == want

            def ask(ids, max_tokens=6, into=None):
                out = c.completions.create(model=model, prompt=ids, max_tokens=max_tokens,
                                           temperature=0, extra_body={"return_token_ids": True,
                                                                      "ignore_eos": True})
                got = out.choices[0].model_extra["token_ids"]
                if into is None:
                    check(ids, max_tokens, got)
                else:  # another thread: the offline engine checks it in this one
                    into.append((ids, got))

            # both workers measure their steps (prefill rate, decode step) first
            outs: list = []
            warm = [threading.Thread(target=ask, args=(prompt_ids(700 + i, 60), 6, outs))
                    for i in range(4)]
            for t in warm:
                t.start()
            for t in warm:
                t.join()
            assert len(outs) == 4
            for ids, got in outs:
                check(ids, 6, got)
            for w in ws:
                load = w.load()
                if not load.get("prefill_tokens_per_s"):  # the other took all four
                    ask(prompt_ids(720, 60))
            assert all(w.load().get("prefill_tokens_per_s") for w in ws)

            def pair(base):
                """A long stream on the worker that gets `base`; while it runs, a prompt
                sharing its prefix (that worker is its decode worker, by cache affinity)."""
                long_ids, tokens, started = base, [], threading.Event()

                def stream():
                    s = c.completions.create(model=model, prompt=long_ids, max_tokens=150,
                                             temperature=0, stream=True,
                                             extra_body={"return_token_ids": True,
                                                         "ignore_eos": True})
                    for chunk in s:
                        tokens.extend(chunk.choices[0].model_extra.get("token_ids") or [])
                        if len(tokens) >= 3:
                            started.set()
                    started.set()

                t = threading.Thread(target=stream)
                t.start()
                assert started.wait(60)
                ask(base + prompt_ids(800 + len(base), 40))
                t.join(120)
                assert not t.is_alive()
                check(long_ids, 150, tokens)  # a failed stream left fewer tokens

            def routes():
                text = httpx.get(url + "/metrics", timeout=10).text
                return {line.split('route="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith("pdserve_proxy_routing_decisions_total{")}

            def transferred(w):
                m = re.search(r'pdserve_requests_total\{finish_reason="transferred",'
                              r'role="both"\} (\S+)', w.get("/metrics").text)
                return float(m.group(1)) if m else 0.0

            def held() -> float:
                text = httpx.get(url + "/metrics", timeout=10).text
                return float(re.search(r"^pdserve_proxy_placement_prefill_role_workers (\S+)",
                                       text, re.M).group(1))

            before = [transferred(w) for w in ws]
            pd0 = routes().get("pd", 0)
            base = prompt_ids(900, 96)
            pair(base)
            assert routes().get("pd", 0) == pd0 + 1, routes()
            moved = [transferred(w) - b for w, b in zip(ws, before)]
            assert sorted(moved) == [0, 1], moved
            # the worker that prefilled for the other keeps P's role: the proxy sends it no
            # decodes until the pool collocates again (never, under this bound), so the next
            # long stream runs on the other worker and the next prompt pairs the same way
            assert held() == 1
            pair(base + prompt_ids(800 + len(base), 40))
            assert routes().get("pd", 0) == pd0 + 2, routes()
            assert [transferred(w) - b for w, b in zip(ws, before)] == [2 * m for m in moved]
        for w in ws:  # nothing held once the streams ended
            load = w.load()
            assert load["blocks_awaiting_transfer"] == 0 and load["num_reserved_blocks"] == 0
    finally:
        stop_all(proc, ws)
