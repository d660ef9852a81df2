"""The single-process engine behind the offline `LLM` API: a queue, a step loop, outputs.

Algorithm of `step()` (one forward per step):
1. Running sequences, oldest first, each schedule their pending tokens (the next prefill
   chunk, or the one token sampled last step) within the step's token budget; if a sequence
   needs a block and none is free, the newest running sequence is preempted (blocks freed,
   recomputed later from prompt + output so far) until it fits.
2. Waiting sequences join, first come first served, while the token budget, max_num_seqs and
   free blocks allow; leading full blocks found in the prefix cache are not recomputed.
3. The runner computes the chunks; sequences whose chunk ends at their last token sample one
   token; finished sequences free their blocks at once.

The prefill and decode workers get their own schedulers in the workers issue; this one keeps
the offline path small and exact.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence as Seq

import torch

from pdserve.engine.block_manager import prefix_block_hashes
from pdserve.engine.model_runner import SeqChunk
from pdserve.engine.sampler import sample
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.setup import EngineParts

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room to generate within max_model_len."""


class LLMEngine:
    """Owns the sequences of one engine; `add_request` then `step` until `has_unfinished()` is
    False. Not thread-safe."""

    def __init__(self, parts: EngineParts):
        self.parts = parts
        self.cfg = parts.config
        self.bm = parts.block_manager
        self.block_size = parts.pool.spec.block_size
        self.max_model_len = parts.max_model_len
        eos = set(parts.model_config.eos_token_ids)
        if parts.tokenizer is not None and parts.tokenizer.eos_token_id is not None:
            eos.add(parts.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self.num_preemptions = 0

    def check_prompt(self, ids: Seq[int]) -> None:
        """Raise ValueError for an empty prompt or token ids outside the vocabulary, and
        PromptTooLongError when the prompt leaves no room for one output token."""
        vocab = self.parts.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "at most max_model_len - 1 prompt tokens leave room for one output token")

    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams) -> Sequence:
        """Queue one sequence (after `check_prompt`)."""
        ids = [int(t) for t in prompt_token_ids]
        self.check_prompt(ids)
        seq = Sequence(seq_id=next(self._ids), prompt_token_ids=ids, params=params,
                       eos_token_ids=() if params.ignore_eos else self.eos_token_ids)
        if not params.greedy:
            seed = params.seed if params.seed is not None else self.cfg.seed + seq.seq_id
            seq.generator = torch.Generator(device=self.parts.device).manual_seed(seed)
        self.waiting.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence now; its blocks are freed."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one forward; returns the sequences that finished in it."""
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []  # (sequence, tokens this step)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n):
                continue  # it preempted itself
            scheduled.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            ids = seq.all_token_ids
            seq.block_hashes = prefix_block_hashes(ids, self.block_size, seq.block_hashes)
            if not self.bm.can_allocate(ids, block_hashes=seq.block_hashes):
                break
            self.waiting.popleft()
            alloc = self.bm.allocate(ids, block_hashes=seq.block_hashes)
            seq.block_table = alloc.block_table
            seq.num_computed_tokens = alloc.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled:
            if self.waiting and not self.running:
                raise RuntimeError("no sequence fits in the KV pool (cannot happen: "
                                   "max_model_len is checked against the pool at start)")
            return []
        return self._run(scheduled)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens of `seq`, preempting the newest running sequences if
        needed. False if `seq` itself had to be preempted."""
        while not self.bm.can_append(seq.block_table, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.bm.append(seq.block_table, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it recomputes prompt + output so far when readmitted."""
        self.running.remove(seq)
        self.bm.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def _run(self, scheduled: list[tuple[Sequence, int]]) -> list[Sequence]:
        chunks = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            ends = start + n == seq.num_tokens
            chunks.append(SeqChunk(seq.all_token_ids[start:start + n], start, seq.block_table,
                                   num_logits=1 if ends else 0))
        logits = self.parts.runner.execute(chunks)
        sampling = [seq for (seq, _), c in zip(scheduled, chunks, strict=True) if c.num_logits]
        tokens = sample(logits, [s.params.temperature for s in sampling],
                        [s.generator for s in sampling]) if sampling else []
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        finished = []
        for seq, token in zip(sampling, tokens, strict=True):
            seq.output_token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self._finish(seq, reason)
                finished.append(seq)
        for seq, _ in scheduled:
            if seq.status is SequenceStatus.RUNNING:
                seq.block_hashes = prefix_block_hashes(seq.all_token_ids, self.block_size,
                                                       seq.block_hashes)
                self.bm.mark_computed(seq.block_table, seq.block_hashes, seq.num_computed_tokens)
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.eos_token_ids or token in seq.params.stop_token_ids:
            return "stop"
        max_tokens = seq.params.max_tokens
        if max_tokens is not None and len(seq.output_token_ids) >= max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        # its computed full blocks stay in the prefix cache after the free
        seq.block_hashes = prefix_block_hashes(seq.all_token_ids, self.block_size, seq.block_hashes)
        if seq.block_table:
            self.bm.mark_computed(seq.block_table, seq.block_hashes, seq.num_computed_tokens)
            self.bm.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
