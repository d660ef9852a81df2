"""LocalBackend's contract: refused requests raise before anything streams; closing or
cancelling a generation aborts it in the engine; deadlines, abort by id, n > 1; close()
ends the thread and fails what still runs; tokens equal the offline engine's."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.common.params import SamplingParams
from pdserve.engine.llm_engine import LLMEngine, PromptTooLongError
from pdserve.proxy import BackendError, ChoiceDelta, GenerationRequest
from tests.proxy.conftest import engine_config, wait_until_idle
from tests.proxy.local_backend import LocalBackend

_ids = iter(range(10**9))


def req(prompt: list[int] | None = None, **params) -> GenerationRequest:
    params.setdefault("seed", 11)
    params.setdefault("max_tokens", 8)
    return GenerationRequest(f"t-{next(_ids)}", prompt or [0, 5, 6, 7], SamplingParams(**params))


async def drain(backend: LocalBackend, r: GenerationRequest) -> list[list[ChoiceDelta]]:
    return [batch async for batch in backend.generate(r)]


def test_refused_requests_raise_before_streaming(backend: LocalBackend) -> None:
    async def main() -> None:
        with pytest.raises(PromptTooLongError):
            await backend.generate(req([5] * 2048)).__anext__()
        with pytest.raises(ValueError, match="vocabulary"):
            await backend.generate(req([5, 4096])).__anext__()
        with pytest.raises(ValueError, match="resume"):
            await backend.generate(GenerationRequest("x", [5], SamplingParams(seed=1),
                                                     output_token_ids=[3])).__anext__()

    asyncio.run(main())
    wait_until_idle(backend)


def test_choices_finish_and_token_counts(backend: LocalBackend) -> None:
    batches = asyncio.run(drain(backend, req(n=3, max_tokens=7, ignore_eos=True, temperature=1.0,
                                             logprobs=1)))
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    for batch in batches:
        for d in batch:
            assert d.choice_index not in finish, "nothing after a finish"
            tokens.setdefault(d.choice_index, []).extend(d.token_ids)
            assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
            if d.finish_reason:
                finish[d.choice_index] = d.finish_reason
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert all(len(t) == 7 for t in tokens.values())
    wait_until_idle(backend)


@pytest.mark.parametrize("how", ["aclose", "cancel", "abort"])
def test_early_exit_aborts_in_the_engine(backend: LocalBackend, how: str) -> None:
    async def main() -> None:
        r = req(max_tokens=2000, ignore_eos=True, n=2)
        agen = backend.generate(r)
        for _ in range(3):
            await agen.__anext__()
        if how == "aclose":
            await agen.aclose()
        elif how == "abort":
            await backend.abort(r.request_id)
            rest = [d async for batch in agen for d in batch]
            assert {d.choice_index for d in rest if d.finish_reason == "abort"} == {0, 1}
        else:
            async def consume() -> None:
                async for _ in agen:
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    t0 = time.monotonic()
    asyncio.run(main())
    wait_until_idle(backend, timeout=5)
    assert time.monotonic() - t0 < 5


def test_deadline_aborts(backend: LocalBackend) -> None:
    r = req(max_tokens=2000, ignore_eos=True)
    r.deadline = time.monotonic() + 0.2
    batches = asyncio.run(drain(backend, r))
    assert batches[-1][-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for b in batches for d in b) < 2000
    wait_until_idle(backend)


def test_close_fails_running_requests_and_matches_offline_engine(proxy_cache_dir) -> None:
    b = LocalBackend(engine_config(num_gpu_blocks_override=64))
    r = req(max_tokens=12, temperature=0.9, seed=99, ignore_eos=True)

    async def main() -> list[int]:
        ids = [t for batch in await drain(b, r) for d in batch for t in d.token_ids]
        agen = b.generate(req(max_tokens=2000, ignore_eos=True))
        await agen.__anext__()
        b.close()
        with pytest.raises(BackendError):
            async for _ in agen:
                pass
        with pytest.raises(BackendError):
            await b.generate(req()).__anext__()
        return ids

    ids = asyncio.run(main())
    assert not b._thread.is_alive()
    assert asyncio.run(b.health())["healthy"] is False
    # the same record on the offline engine draws the same tokens
    engine = LLMEngine(b.parts)
    offline = engine.add_request(r.prompt_token_ids, r.params, request_id="offline")
    while engine.has_unfinished():
        engine.step()
    assert offline.seqs[0].output_token_ids == ids
