"""One OpenAI request running on a backend: token deltas in, per-choice text updates out.

`Generation.start()` submits the `GenerationRequest` and waits for the backend's first batch
(a refused request raises here, before any response bytes exist). `updates()` then yields,
per backend batch, one `ChoiceUpdate` per choice with news: released text (detokenized, stop
strings applied), the tokens it counts, their logprobs and the finish. When a stop string
fires, that choice ignores later tokens; when every choice is done the backend generator is
closed, which aborts whatever the engine still runs (e.g. a choice ended by a stop string).
A generation whose every choice finished is observed once in the e2e latency histogram
(`start()` to the batch that finished the last choice, stop strings included); one that
fails or is abandoned is not. `collect()` runs a generation to the end for a non-streaming
response. `GenerationGroup` runs several as one (a completion's batch of prompts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from pdserve.common.wire import Logprob
from pdserve.proxy import metrics
from pdserve.proxy.backend import Backend, BackendError, ChoiceDelta, GenerationRequest
from pdserve.proxy.detokenizer import TextStream
from pdserve.proxy.errors import OpenAIError
from pdserve.proxy.tokenization import ProxyTokenizer

logger = logging.getLogger(__name__)


@dataclass
class ChoiceUpdate:
    """What one choice has to tell the client after one backend batch."""

    index: int
    text: str
    token_ids: list[int]  # counted tokens this update (the one completing a stop included)
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that fired


@dataclass
class ChoiceResult:
    """A whole choice, for a non-streaming response."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _Choice:
    def __init__(self, index: int, stream: TextStream | None, stop_token_ids: Sequence[int]):
        self.index = index
        self.stream = stream
        self.stop_token_ids = set(stop_token_ids)
        self.num_tokens = 0
        self.done = False

    def apply(self, delta: ChoiceDelta, want_logprobs: bool,
              drop_output: bool = False) -> ChoiceUpdate | None:
        if self.done:
            return None  # ended by a stop string; the engine may still be running it
        if drop_output:  # max_tokens 0: the token drawn is not the client's
            if delta.finish_reason is None:
                return None
            self.done = True
            return ChoiceUpdate(self.index, "", [], [] if want_logprobs else None, "length")
        text: list[str] = []
        counted = 0
        upd = ChoiceUpdate(self.index, "", [], [] if want_logprobs else None)
        for tid in delta.token_ids:
            counted += 1
            if self.stream is not None:
                text.append(self.stream.add(tid))
                if self.stream.stopped is not None:
                    upd.finish_reason, upd.stop_reason = "stop", self.stream.stopped
                    break
        upd.token_ids = list(delta.token_ids[:counted])
        if upd.logprobs is not None and delta.logprobs is not None:
            upd.logprobs = list(delta.logprobs[:counted])
        self.num_tokens += counted
        if upd.finish_reason is None and delta.finish_reason is not None:
            if delta.finish_reason == "abort":
                raise BackendError("the backend aborted the request")
            if self.stream is not None:
                text.append(self.stream.finish())
            if self.stream is not None and self.stream.stopped is not None:
                upd.finish_reason, upd.stop_reason = "stop", self.stream.stopped
            else:
                upd.finish_reason = delta.finish_reason
                last = delta.token_ids[-1] if delta.token_ids else None
                if delta.finish_reason == "stop" and last in self.stop_token_ids:
                    upd.stop_reason = last
        upd.text = "".join(text)
        self.done = upd.finish_reason is not None
        if not (upd.text or upd.token_ids or upd.finish_reason):
            return None
        return upd


class Generation:
    """Drives one `GenerationRequest` through `backend`; see the module docstring."""

    def __init__(self, backend: Backend, request: GenerationRequest,
                 tokenizer: ProxyTokenizer | None, *, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True,
                 index_offset: int = 0, drop_output: bool = False):
        """`index_offset`: added to each choice's index in updates (prompt i of a batch of
        prompts with n choices each: i * n). `drop_output`: the request runs one token that
        the client does not get (max_tokens 0: the prompt's logprobs alone)."""
        self.backend = backend
        self.request = request
        self.want_logprobs = request.params.logprobs is not None
        self.drop_output = drop_output
        self.choices = {
            index_offset + i: _Choice(index_offset + i, None if tokenizer is None else TextStream(
                tokenizer, stop, include_stop_str_in_output=include_stop_str_in_output,
                skip_special_tokens=skip_special_tokens), request.params.stop_token_ids)
            for i in request.choice_indices()
        }
        self.index_offset = index_offset
        # params.prompt_logprobs: one entry per prompt token, known once start() returned
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self._num_done = 0  # choices finished (`_apply`)
        self._agen: AsyncGenerator[list[ChoiceDelta], None] | None = None
        self._first: list[ChoiceDelta] | None = None
        self._started: float | None = None  # None again once observed
        self.first_at: float | None = None  # time.monotonic() of the first batch

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices.values())

    async def start(self) -> None:
        """Submit and wait for the first batch. Raises OpenAIError: 400 for a request the
        backend refuses, 503 when the backend cannot serve."""
        self._started = time.monotonic()
        self._agen = self.backend.generate(self.request)
        try:
            self._first = await self._agen.__anext__()
            self.first_at = time.monotonic()
            for delta in self._first:
                if delta.prompt_logprobs is not None:
                    self.prompt_logprobs = delta.prompt_logprobs
        except StopAsyncIteration:
            self._first = []
        except ValueError as e:
            await self.aclose()
            raise OpenAIError(str(e), param="prompt") from e
        except BackendError as e:
            await self.aclose()
            raise OpenAIError(str(e), status_code=e.status_code, headers=e.headers) from e
        except BaseException:
            await self.aclose()
            raise

    async def updates(self) -> AsyncGenerator[list[ChoiceUpdate], None]:
        """Per backend batch, the choices with news. Raises OpenAIError(503) if the backend
        fails mid-way. Always closes the backend generator (aborting the engine request)."""
        if self._agen is None:
            raise RuntimeError("Generation.start() first")
        try:
            batch = self._first
            self._first = None
            while True:
                if batch is not None:
                    out = self._apply(batch)
                    done = self._num_done == len(self.choices)
                    if done:  # before the yield: the consumer may stop at the last batch
                        self._observe_e2e()
                    if out:
                        yield out
                    if done:
                        return
                try:
                    batch = await self._agen.__anext__()
                except StopAsyncIteration:
                    raise BackendError("the backend ended the request without finishing "
                                       "every choice") from None
        except BackendError as e:
            raise OpenAIError(str(e), status_code=e.status_code) from e
        finally:
            await self.aclose()

    def _observe_e2e(self) -> None:
        # here, not in the backend: closing its generator at the last batch (which aborts
        # what a stop string left running) skips any code after the backend's loop
        started, self._started = self._started, None
        if started is not None:
            metrics.E2E.observe(time.monotonic() - started)

    def _apply(self, batch: list[ChoiceDelta]) -> list[ChoiceUpdate]:
        out = []
        for delta in batch:
            choice = self.choices.get(delta.choice_index + self.index_offset)
            if choice is None:
                logger.warning("request %s: delta for unknown choice %d", self.request.request_id,
                               delta.choice_index)
                continue
            upd = choice.apply(delta, self.want_logprobs, self.drop_output)
            if upd is not None:
                out.append(upd)
                if upd.finish_reason is not None:
                    self._num_done += 1
        return out

    async def aclose(self) -> None:
        """Close the backend generator (aborts the engine request if it still runs).
        Shielded: it must finish even inside a cancelled task."""
        agen, self._agen = self._agen, None
        if agen is not None:
            with anyio.CancelScope(shield=True):
                await agen.aclose()


class GenerationGroup:
    """Several generations answered as one (a completion with a batch of prompts): their
    choices together (each generation's indices already offset), started together (one
    refused: all closed, its error raised), their updates merged as they come. The same
    surface as `Generation` for the front, the stream and the access log."""

    def __init__(self, gens: Sequence[Generation]):
        self.gens = list(gens)
        self.request = self.gens[0].request  # for logs: the first prompt's
        self.want_logprobs = self.gens[0].want_logprobs
        self.choices = {i: c for g in self.gens for i, c in g.choices.items()}
        self.first_at: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return sum(g.num_prompt_tokens for g in self.gens)

    @property
    def num_completion_tokens(self) -> int:
        return sum(g.num_completion_tokens for g in self.gens)

    async def start(self) -> None:
        tasks = [asyncio.ensure_future(g.start()) for g in self.gens]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.aclose()
            raise
        self.first_at = min(g.first_at for g in self.gens if g.first_at is not None)

    async def updates(self) -> AsyncGenerator[list[ChoiceUpdate], None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(g: Generation) -> None:
            try:
                async for batch in g.updates():
                    queue.put_nowait(batch)
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait(e)
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.ensure_future(pump(g)) for g in self.gens]
        live = len(tasks)
        try:
            while live:
                item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for g in self.gens:
                await g.aclose()


async def collect(gen: Generation | GenerationGroup) -> list[ChoiceResult]:
    """Run a started generation to the end; the choices in index order."""
    results = {i: ChoiceResult(i, logprobs=[] if gen.want_logprobs else None)
               for i in gen.choices}
    texts: dict[int, list[str]] = {i: [] for i in gen.choices}
    async for batch in gen.updates():
        for upd in batch:
            r = results[upd.index]
            texts[upd.index].append(upd.text)
            r.token_ids.extend(upd.token_ids)
            if r.logprobs is not None and upd.logprobs is not None:
                r.logprobs.extend(upd.logprobs)
            if upd.finish_reason is not None:
                r.finish_reason, r.stop_reason = upd.finish_reason, upd.stop_reason
    for i, r in results.items():
        r.text = "".join(texts[i])
    return [results[i] for i in sorted(results)]
