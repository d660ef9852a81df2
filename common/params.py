"""Sampling parameters of one request, as vLLM users know them, checked at construction.

Defaults and ranges follow vLLM's `SamplingParams`: a bad value raises ValueError naming the
parameter, e.g. "SamplingParams.top_p must be in (0, 1], got 1.5".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-2


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output text (vLLM's `structured_outputs`): exactly one of a JSON
    schema (as JSON text; '{"type": "object"}' for any object), a regular expression, a
    list of choices, or a grammar (Lark, as llguidance reads it, or GBNF)."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("StructuredOutputs needs exactly one of json, regex, choice, "
                             f"grammar, got {given or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("StructuredOutputs.choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for k in ("json", "regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"StructuredOutputs.{k} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar")
                    if getattr(self, k) is not None)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy; one in (0, MIN_TEMPERATURE) is raised to MIN_TEMPERATURE, as vLLM
    does (dividing logits by 1e-300 overflows to inf). top_k 0 or -1, top_p 1 and min_p 0
    disable those filters.
    repetition_penalty (> 1 discourages) applies to tokens of the prompt and the output;
    presence and frequency penalties to output tokens only. min_tokens keeps EOS and
    stop_token_ids from being drawn until that many tokens exist. logprobs = N returns the
    sampled token's logprob and the N most likely, from the distribution it was drawn from.
    structured: the output must follow this grammar (each draw masked to the tokens it
    allows; engine/structured.py). allowed_token_ids: every draw is one of these (vLLM's).
    prompt_logprobs = N returns, for each prompt token after the first, its logprob and the N
    most likely tokens at that position (the model's raw distribution); such a prompt is
    computed in full (no prefix-cache hit). logit_bias: added to those tokens' logits before
    penalties (OpenAI's; each value in [-100, 100]).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    structured: StructuredOutputs | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k < 2**31:
            raise bad("top_k", "must be -1 or 0 (disabled) or an integer in [1, 2^31)")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed", "must fit in 64 bits")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not all(_is_int(t) and 0 <= t < 2**31 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of integers in [0, 2^31)")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids or not all(
                    _is_int(t) and 0 <= t < 2**31 for t in self.allowed_token_ids):
                raise bad("allowed_token_ids", "must be a non-empty list of integers in "
                          "[0, 2^31) or None")
            object.__setattr__(self, "allowed_token_ids", list(self.allowed_token_ids))
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(t) and 0 <= t < 2**31 and _is_num(v) and -100 <= v <= 100
                    for t, v in self.logit_bias.items()):
                raise bad("logit_bias", "must map token ids in [0, 2^31) to numbers in "
                          "[-100, 100]")
            object.__setattr__(self, "logit_bias", {int(t): float(v) for t, v in
                                                    self.logit_bias.items()} or None)
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise bad("structured", "must be a StructuredOutputs or None")
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        if 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if self.seed is not None and self.seed >= 2**63:  # keep the bits, store as int64
            object.__setattr__(self, "seed", self.seed - 2**64)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
