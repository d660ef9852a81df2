"""Sampling parameters of one request, as vLLM users know them, checked at construction.

This issue's sampler does greedy (temperature 0) and temperature sampling; top-k/top-p/min-p,
penalties, logprobs and n > 1 arrive with the sampler issue.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ValueError naming the field."""

    n: int = 1
    temperature: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.n != 1:
            raise bad("n", "must be 1 for now (n > 1 comes with the sampler issue)")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0.0 or t == float("inf"):
            raise bad("temperature", "must be a finite number >= 0")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "must be an integer or None")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                   for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
