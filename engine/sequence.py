"""A sequence being generated: its tokens, its blocks, and how much of it is in the KV cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from pdserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks; computes a prefill chunk or one decode token a step
    FINISHED = "finished"  # blocks freed


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of full blocks of all tokens
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)
