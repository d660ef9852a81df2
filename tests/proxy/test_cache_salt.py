"""`cache_salt` at the proxy: both endpoints take it (vLLM's field) and hand it to the engine,
where it keeps one tenant's prompt out of another's prefix cache; a bad one is an OpenAI 400
naming it; it never changes the tokens. The proxy's routing names (the hashes
`ClusterBackend.generate` computes) differ per salt too, and the record carries the salt
across the wire, old records (without it) still decoding."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import openai
import pytest

from pdserve.common import wire
from pdserve.common.params import SamplingParams
from pdserve.common.prefix import MAX_CACHE_SALT_CHARS, prefix_block_hashes
from pdserve.common.wire import RequestRecord
from tests.proxy.conftest import MODEL, wait_until_idle
from tests.proxy.local_backend import LocalBackend
from tests.proxy.openapi_schema import validate

BS = 16
# 80 prompt tokens (5 full blocks), ids no other test sends
PROMPT = [(37 * i + 11) % 3000 + 500 for i in range(80)]
CHAT = [{"role": "user", "content": "the shared system prompt of every tenant " * 8}]


def _completion(http: httpx.Client, **extra: Any) -> list[int]:
    r = http.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.7, "seed": 5,
        "ignore_eos": True, "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _hits_of(backend: LocalBackend, send: Any) -> int:
    """Prefix-cache hit tokens the engine counted for what `send()` sent."""
    before = wait_until_idle(backend)["num_prefix_hits"]
    send()
    return wait_until_idle(backend)["num_prefix_hits"] - before


def test_completions_tenants_share_no_cached_blocks(http: httpx.Client,
                                                    backend: LocalBackend) -> None:
    tokens = []
    send = lambda **kw: tokens.append(_completion(http, **kw))  # noqa: E731
    assert _hits_of(backend, lambda: send(cache_salt="tenant-a")) == 0
    assert _hits_of(backend, lambda: send(cache_salt="tenant-b")) == 0
    # the same salt hits (so the two zeros above can fail); no salt shares nothing with either
    assert _hits_of(backend, lambda: send(cache_salt="tenant-a")) == 4 * BS
    assert _hits_of(backend, lambda: send()) == 0
    assert _hits_of(backend, lambda: send()) == 4 * BS
    assert all(t == tokens[0] for t in tokens)  # caching changes, results never


def test_chat_takes_cache_salt(client: openai.OpenAI, backend: LocalBackend) -> None:
    texts = []

    def send(**extra: Any) -> None:
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True, **extra})
        texts.append(r.choices[0].message.content)

    assert _hits_of(backend, lambda: send(cache_salt="tenant-a")) == 0
    assert _hits_of(backend, lambda: send(cache_salt="tenant-b")) == 0
    assert _hits_of(backend, lambda: send(cache_salt="tenant-a")) > 0
    assert all(t == texts[0] for t in texts)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("salt", ["", "x" * (MAX_CACHE_SALT_CHARS + 1), 12, ["a"]])
def test_bad_cache_salt_is_a_400_naming_it(http: httpx.Client, path: str, salt: Any) -> None:
    body = {"model": MODEL, "max_tokens": 2, "cache_salt": salt,
            **({"prompt": [5, 6, 7]} if path == "/v1/completions" else {"messages": CHAT})}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    err = r.json()["error"]
    assert err["param"] == "cache_salt" and "cache_salt" in err["message"], err
    assert err["type"] == "BadRequestError"


def test_routing_hashes_differ_per_salt() -> None:
    # what ClusterBackend.generate computes to route by prefix (and what workers register)
    plain = prefix_block_hashes(PROMPT, BS)
    a = prefix_block_hashes(PROMPT, BS, cache_salt="tenant-a")
    b = prefix_block_hashes(PROMPT, BS, cache_salt="tenant-b")
    assert len(plain) == len(a) == len(b) == 5
    assert not set(a) & set(b) and not set(a) & set(plain) and not set(b) & set(plain)
    assert a == prefix_block_hashes(PROMPT, BS, cache_salt="tenant-a")


def test_the_record_carries_the_salt_and_old_records_decode() -> None:
    rec = RequestRecord("r-1", [5, 6, 7], SamplingParams(seed=1), cache_salt="tenant-a")
    frame = wire.DATA_PATH.encode(wire.Generate(rec=rec))
    assert wire.DATA_PATH.decode(frame).rec.cache_salt == "tenant-a"
    raw = msgspec.to_builtins(rec)
    del raw["cache_salt"]  # a record from before the field
    old = wire.DATA_PATH.decode(msgspec.msgpack.encode({"k": "generate", "rec": raw}))
    assert old.rec.cache_salt is None
    raw["cache_salt"] = ""
    with pytest.raises(wire.WireError, match="cache_salt") as e:
        wire.DATA_PATH.decode(msgspec.msgpack.encode({"k": "generate", "rec": raw}))
    assert e.value.rid == "r-1"
