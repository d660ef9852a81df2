"""A request and its sequences (one per choice): tokens, blocks, and how much is cached.

A sequence keeps one growing token list (prompt, then each drawn token appended): the
scheduler and the runner slice it by position, nothing rebuilds it per step.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.common.params import SamplingParams
from pdserve.common.wire import Logprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks; computes a prefill chunk or one decode token a step
    FINISHED = "finished"  # blocks freed (or, on P, held for the transfer)


@dataclass(eq=False)
class Request:
    """One prompt with n choices. It starts with choice 0 alone; the others fork from it
    when the prompt's logits are ready (one prefill for all n)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    seqs: list[Sequence] = field(default_factory=list)
    expected: int | None = None  # D: choices P left running (default: params.n)
    cache_salt: str | None = None  # salts its prefix-block names (common/prefix.py)
    # token_mask(output token ids so far) -> bool tensor [vocab] of the tokens the next draw
    # may take (True: allowed), or None: unrestricted. Structured outputs fill it.
    token_mask: Callable[[list[int]], Any] | None = None
    # prompt logprobs (params.prompt_logprobs): position -> entry, filled by the prefill's
    # steps; `prompt_logprobs_done` once delivered (or never to compute: D of a P/D pair)
    prompt_logprobs: dict[int, dict[int, Logprob]] = field(default_factory=dict)
    prompt_logprobs_done: bool = False
    # a both-role engine prefills it for another worker (flexible roles): after the first
    # token its blocks are held for the KV transfer, as a prefill engine's are
    prefill_only: bool = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_done

    @property
    def finished(self) -> bool:
        want = self.expected if self.expected is not None else self.params.n
        return len(self.seqs) >= want and all(
            s.status is SequenceStatus.FINISHED for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    token_ids: list[int]  # prompt + output so far
    choice_index: int = 0
    eos_token_ids: tuple[int, ...] = ()
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of full blocks of all tokens
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    finish_reason: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the output so far (results and tests; hot paths slice `token_ids`)."""
        return self.token_ids[self.num_prompt_tokens:]
