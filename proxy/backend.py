"""The seam between the OpenAI front (`proxy/app.py`) and whatever generates tokens.

The front turns an OpenAI request into one `GenerationRequest` (token ids in, sampling params
with a seed always set) and hands it to a `Backend`; the backend streams back, per engine
step, a list of `ChoiceDelta`s (new token ids, logprobs, finish reasons). Text, stop strings,
usage and response shapes stay in the front: backends are token engines (DESIGN.md §1).

Implementations: `proxy/local_backend.py` (an `LLMEngine` in a background thread, for tests
and single-process serving); the P/D routing backend comes with the routing issue.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pdserve.engine.record import RequestRecord
from pdserve.engine.sampler import Logprob
from pdserve.engine.tokenizer import Tokenizer

FINISH_REASONS = ("stop", "length", "abort")


class BackendError(RuntimeError):
    """The backend cannot serve the request for a reason of its own (dead engine, shut down,
    no worker): the front answers 503, or an error event mid-stream."""


# The request record of DESIGN.md §1: one type from the front through every worker.
# `params.seed` is always set (the front draws one for unseeded requests, so a retry or a
# re-submission draws the same tokens); see engine/record.py.
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


@runtime_checkable
class Backend(Protocol):
    """What the front needs of a token engine. Attributes are fixed after construction."""

    model_name: str  # the served model name when the app is given none
    max_model_len: int  # prompt + output tokens
    tokenizer: Tokenizer | None  # None: token-ids-only mode (text prompts are refused)
    eos_token_ids: Sequence[int]

    def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        """Run one request; yields one list of deltas per engine step until every choice has
        a finish_reason, then stops.

        Called once per request by the front, from the event loop. A request the backend
        refuses (ValueError naming the problem, e.g. a prompt too long, an id outside the
        vocabulary) raises from the first `__anext__`, before anything is yielded;
        `BackendError` means the backend itself cannot serve. Closing the generator early
        (`aclose()`, or cancelling the task that awaits it) aborts the request in the engine
        and frees its KV blocks; the caller need not call `abort` as well.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a running request by id; a no-op for ids that are unknown or finished. Its
        generator then yields the remaining choices with finish_reason "abort"."""
        ...

    async def health(self) -> dict[str, Any]:
        """A snapshot for /health and operators: {"healthy": bool, ...details}. Cheap; never
        blocks on the engine."""
        ...
