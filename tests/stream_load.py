"""Streams kept busy while a test changes the cluster under them: `streams` client tasks (the
real `openai` SDK) each send greedy streamed completions one after another (task k: prompts
k, k + streams, k + 2 * streams, ... modulo the list) until the operation ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import openai


async def stream_while(proxy: str, prompts: Sequence[list[int]], streams: int, max_tokens: int,
                       operate: Callable[[], Awaitable[Any]]
                       ) -> tuple[dict[int, list[int]], list[str], Any]:
    """(token ids per request number, the errors of failed requests, what `operate`
    returned); request i asked for prompts[i % len(prompts)]."""
    got: dict[int, list[int]] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def client_task(c: openai.AsyncOpenAI, model: str, k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                stream = await c.completions.create(
                    model=model, prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                    temperature=0, stream=True,
                    extra_body={"ignore_eos": True, "return_token_ids": True})
                ids: list[int] = []
                async for chunk in stream:
                    if chunk.choices:
                        ids += (chunk.choices[0].model_extra or {}).get("token_ids") or []
                got[i] = ids
            except openai.APIError as e:
                failures.append(f"request {i}: {e!r}")
            i += streams

    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="none", max_retries=0,
                                  timeout=120) as c:
        model = (await c.models.list()).data[0].id
        tasks = [asyncio.create_task(client_task(c, model, k)) for k in range(streams)]
        try:
            result = await operate()
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return got, failures, result


def prompts_and_answers(seed: int, count: int, lengths: tuple[int, int], max_tokens: int,
                        **llm_kw: Any) -> tuple[list[list[int]], list[list[int]]]:
    """`count` random token-id prompts (lengths in [lo, hi)) and the offline engine's greedy
    answers to them (the built-in model; `llm_kw` as the workers are configured)."""
    import random

    from pdserve import LLM, SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 4000) for _ in range(rng.randrange(*lengths))]
               for _ in range(count)]
    llm = LLM(None, use_tqdm_on_load=False, **llm_kw)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    return prompts, [o.outputs[0].token_ids for o in outs]


def differing(got: dict[int, list[int]], want: list[list[int]]) -> list[int]:
    """The request numbers whose tokens differ from the offline answer to their prompt."""
    return [i for i, ids in got.items() if ids != want[i % len(want)]]
