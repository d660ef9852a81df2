"""The seam between the OpenAI front (`proxy/app.py`) and whatever generates tokens.

The front turns an OpenAI request into one `GenerationRequest` (token ids in, sampling params
with a seed always set) and hands it to a `Backend`; the backend streams back, per engine
step, a list of `ChoiceDelta`s (new token ids, logprobs, finish reasons). Text, stop strings,
usage and response shapes stay in the front: backends are token engines (DESIGN.md §1).

Implementations: `proxy/cluster_backend.py` (P/D and both-role workers over the data path);
the OpenAI-surface tests run `create_app` over `tests/proxy/local_backend.py` (an engine in a
thread of the test process).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pdserve.common.wire import Logprob, RequestRecord, TokenRow
from pdserve.engine.tokenizer import Tokenizer


class BackendError(RuntimeError):
    """The backend cannot serve the request for a reason of its own (dead engine, shut down,
    no worker): the front answers `status_code`, or an error event mid-stream."""

    status_code = 503
    headers: dict[str, str] | None = None  # e.g. Retry-After


class RequestFailedError(BackendError):
    """The engine failed on this request on two workers: not retried again (a 500)."""

    status_code = 500


# The request record of DESIGN.md §1: one type from the front through every worker.
# `params.seed` is always set (the front draws one for unseeded requests, so a retry or a
# re-submission draws the same tokens); see common/wire.py.
GenerationRequest = RequestRecord


@dataclass
class ChoiceDelta:
    """One choice's news from one engine step.

    `token_ids` are new tokens only (possibly empty on a bare finish); `logprobs[i]` belongs
    to `token_ids[i]` (sampled token first, then the top-N; None unless asked for).
    `finish_reason` is "stop" (EOS or a stop token id, which is then the last token),
    "length", "abort" (the backend gave up: deadline, shutdown), or None while running.
    """

    choice_index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    # the request's prompt logprobs (params.prompt_logprobs), on one delta of the first batch
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


def to_deltas(rows: Sequence[TokenRow]) -> list[ChoiceDelta]:
    """One engine step's rows of one request, as one ChoiceDelta per choice."""
    if len(rows) == 1:  # the common case: one choice, one token this step
        r = rows[0]
        return [ChoiceDelta(r.choice_index, [r.token_id],
                            None if r.logprobs is None else [r.logprobs], r.finish_reason,
                            r.prompt_logprobs)]
    out: dict[int, ChoiceDelta] = {}
    for r in rows:
        d = out.setdefault(r.choice_index, ChoiceDelta(r.choice_index, []))
        d.token_ids.append(r.token_id)
        if r.logprobs is not None:
            d.logprobs = (d.logprobs or []) + [r.logprobs]
        d.finish_reason = r.finish_reason or d.finish_reason
        if r.prompt_logprobs is not None:
            d.prompt_logprobs = r.prompt_logprobs
    return list(out.values())


@runtime_checkable
class Backend(Protocol):
    """What the front needs of a token engine. Attributes are fixed after construction
    (max_model_len from when an engine is ready)."""

    model_name: str  # the served model name when the app is given none
    model_path: str | None  # the checkpoint (/v1/models' "root"), if the backend knows it
    max_model_len: int  # prompt + output tokens; 0 while no engine is ready (`wait_ready`)
    vocab_size: int  # token ids are below it; 0 while no engine is ready
    tokenizer: Tokenizer | None  # None: token-ids-only mode (text prompts are refused)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for an engine that can serve (max_model_len known);
        True once there is one. The front calls it for every request: it must return at once
        when there is one."""
        ...

    def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        """Run one request; yields one list of deltas per engine step until every choice has
        a finish_reason, then stops.

        Called once per request by the front, from the event loop. A request the backend
        refuses (ValueError naming the problem, e.g. a prompt too long, an id outside the
        vocabulary) raises from the first `__anext__`, before anything is yielded;
        `BackendError` means the backend itself cannot serve. Closing the generator early
        (`aclose()`, or cancelling the task that awaits it) aborts the request in the engine
        and frees its KV blocks.
        """
        ...

    async def health(self) -> dict[str, Any]:
        """A snapshot for /health and operators: {"healthy": bool, ...details}. Cheap; never
        blocks on the engine."""
        ...
