"""A request with the validator's largest stop list (MAX_STOPS strings of MAX_STOP_CHARS
characters) does not hold up other streams: the proxy matches stop strings on its event loop,
so their cost per token is every stream's latency (issue 17: 350k stop strings froze every
stream and /health for 59 s).

The backend is a ticker: one token per choice every ITL seconds, cycling through plain words,
so that inter-token gaps seen by clients measure the proxy's loop and nothing else. The heavy
request's stops are chosen to be the old matcher's worst case that the validator lets in:
one stop keeps matching the generated text ~1000 characters deep (so the held text stays
long), the other 63 never match, and the old hold-back scan tried every prefix length of
every stop per token (tens of milliseconds per token, more than the ITL).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import pytest

from pdserve.engine.builtin_model import builtin_model_path
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.proxy import ChoiceDelta, GenerationRequest, create_app
from pdserve.proxy.detokenizer import _ManyStops
from pdserve.proxy.validation import MAX_STOP_CHARS, MAX_STOPS
from tests.proxy.conftest import MODEL, Served, serve

ITL = 0.010  # seconds between a request's tokens
WORDS = " the of and to in is you that it was for on are as with his they at be this have"
NUM_OTHERS = 4  # concurrent ordinary streams
OTHER_TOKENS = 200
HEAVY_TOKENS = 400  # outlives the ordinary streams started after it
HEAVY_N = 4  # its choices (the old matcher's cost was per choice: 4 x 7 ms per token)
MAX_P99_INCREASE = 0.020


class Ticker:
    """A Backend yielding, for every choice, the next id of `ids` (cyclic) every ITL."""

    model_name = MODEL
    model_path = None
    max_model_len = 4096

    def __init__(self, tokenizer: Any, ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.ids = ids

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        loop = asyncio.get_running_loop()
        n = req.params.max_tokens
        start = loop.time()
        for k in range(n):
            # on a fixed clock: a late loop gets the missed tokens at once, not a drift
            await asyncio.sleep(max(0.0, start + (k + 1) * ITL - loop.time()))
            finish = "length" if k == n - 1 else None
            yield [ChoiceDelta(c, [self.ids[k % len(self.ids)]], None, finish)
                   for c in req.choice_indices()]

    async def wait_ready(self, timeout: float) -> bool:
        return True

    async def health(self) -> dict[str, Any]:
        return {"healthy": True}


@pytest.fixture(scope="module")
def tokenizer(proxy_cache_dir: Any) -> Any:
    t = load_tokenizer(builtin_model_path())
    assert t is not None
    return t


@pytest.fixture(scope="module")
def word_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.encode(WORDS, add_special_tokens=False)
    assert tokenizer.decode(ids) == WORDS
    return ids


@pytest.fixture(scope="module")
def ticker(tokenizer: Any, word_ids: list[int]) -> Iterator[Served]:
    with serve(create_app(Ticker(tokenizer, word_ids))) as s:
        yield s


def heavy_stops(text: str) -> list[str]:
    """MAX_STOPS stops of MAX_STOP_CHARS characters: 63 that never match (they start with
    "#"), then one that matches `text` (a prefix of the generated text, which is periodic)
    down to its last character. The old matcher scanned the 63 first, at every length."""
    n = MAX_STOP_CHARS - 1
    assert len(text) >= n + MAX_STOPS and "#" not in text
    stops = ["#" + text[i:i + n] for i in range(MAX_STOPS - 1)] + [text[:n] + "#"]
    assert len(stops) == MAX_STOPS and all(len(s) == MAX_STOP_CHARS for s in stops)
    return stops


async def _stream(c: httpx.AsyncClient, body: dict[str, Any],
                  started: asyncio.Event | None = None) -> tuple[list[float], list[str], int]:
    """(arrival times of the events that carry a choice, each choice's text, the tokens
    counted in all)."""
    times: list[float] = []
    text: dict[int, str] = {}
    num_tokens = 0
    async with c.stream("POST", "/v1/completions",
                        json={"model": MODEL, "prompt": "Go", "stream": True,
                              "return_token_ids": True, **body}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    times.append(time.perf_counter())
                    text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
                    num_tokens += len(choice.get("token_ids") or [])
                    if started is not None:
                        started.set()
    return times, [text[i] for i in sorted(text)], num_tokens


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times[1:], times[2:])]  # from the 2nd token on


async def _measure(url: str, heavy: dict[str, Any] | None) -> tuple[
        list[float], tuple[list[float], list[str], int] | None]:
    """(the ordinary streams' inter-token gaps, what the heavy request streamed)."""
    other = {"max_tokens": OTHER_TOKENS}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        heavy_task = None
        if heavy is not None:  # streaming already when the others start
            started = asyncio.Event()
            heavy_task = asyncio.create_task(_stream(c, heavy, started))
            await asyncio.wait_for(started.wait(), 10)
        results = await asyncio.gather(*(_stream(c, other) for _ in range(NUM_OTHERS)))
        heavy_result = await heavy_task if heavy_task is not None else None
    assert all(len(times) == n == OTHER_TOKENS for times, _, n in results)
    if heavy_result is not None:  # it streamed all along: its last token came after theirs
        assert heavy_result[0][-1] > max(times[-1] for times, _, _ in results)
    return [g for times, _, _ in results for g in _gaps(times)], heavy_result


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


@pytest.mark.timeout(90)
def test_the_largest_stop_list_does_not_delay_other_streams(ticker: Served, tokenizer: Any,
                                                           word_ids: list[int]) -> None:
    text = tokenizer.decode(word_ids * 20)
    stops = heavy_stops(text)
    heavy = {"max_tokens": HEAVY_TOKENS, "n": HEAVY_N, "stop": stops}
    asyncio.run(_measure(ticker.url, None))  # warm-up: connections, first requests
    base, _ = asyncio.run(_measure(ticker.url, None))
    loaded, heavy_result = asyncio.run(_measure(ticker.url, heavy))
    increase = p99(loaded) - p99(base)
    summary = (f"other streams' ITL p99: {p99(base) * 1e3:.1f} ms alone, "
               f"{p99(loaded) * 1e3:.1f} ms beside the heavy request (max "
               f"{max(base) * 1e3:.1f} -> {max(loaded) * 1e3:.1f} ms)")
    print(summary)
    # the heavy request ran to the end, its stops held back text but never fired
    assert heavy_result is not None
    _, heavy_texts, heavy_tokens = heavy_result
    assert heavy_tokens == HEAVY_N * HEAVY_TOKENS
    assert heavy_texts == [tokenizer.decode((word_ids * HEAVY_TOKENS)[:HEAVY_TOKENS])] * HEAVY_N
    assert increase <= MAX_P99_INCREASE, summary


@pytest.mark.timeout(60)
def test_no_token_of_the_largest_stop_lists_takes_long(word_ids: list[int],
                                                      tokenizer: Any) -> None:
    """The matcher alone, per released delta, on stop lists that make the automaton's setup
    expensive (each stop walked ~1000 characters deep): its setup is spread over the
    characters, no single one pays for a whole level."""
    text = tokenizer.decode(word_ids * 40)
    pieces = [tokenizer.decode([i]) for i in word_ids] * 40
    n = MAX_STOP_CHARS - 1
    cases = {
        "the old worst case": (heavy_stops(text), pieces),
        "every stop deep in the text": ([text[i:i + n] + "#" for i in range(MAX_STOPS)],
                                        pieces),
        # a long shared run then 64 different ends: one trie level of 64 long failure walks
        "one run, many ends": (["a" * n + chr(0x100 + i) for i in range(MAX_STOPS)],
                               ["aaaa"] * 600),
        # distinct parents whose failure links all run down the same long run
        "distinct parents": (["a" * MAX_STOP_CHARS] + [chr(0x100 + i) + "a" * (n - 1)
                                                       + chr(0x200 + i)
                                                       for i in range(MAX_STOPS - 1)],
                             ["aaaa"] * 600),
    }
    for name, (stops, deltas) in cases.items():
        t = time.perf_counter()
        f = _ManyStops(stops)
        setup = time.perf_counter() - t
        worst = 0.0
        for d in deltas:
            t = time.perf_counter()
            hit = f.release(d, False)[2]
            worst = max(worst, time.perf_counter() - t)
            if hit:
                break
        assert f.ac.built == f.ac.maxlen, name  # the text did walk every level
        print(f"{name}: setup {setup * 1e3:.2f} ms, slowest delta {worst * 1e3:.2f} ms")
        assert setup < 0.05 and worst < 0.02, (name, setup, worst)
