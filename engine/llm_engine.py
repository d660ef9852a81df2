"""The single-process engine behind the offline `LLM` API: a queue, a step loop, outputs.

Algorithm of `step()` (one forward per step):
1. Running sequences, oldest first, each schedule their pending tokens (the next prefill
   chunk, or the one token sampled last step) within the step's token budget; if a sequence
   needs a block and none is free, the newest running sequence is preempted (blocks freed,
   recomputed later from prompt + output so far) until it fits.
2. Waiting sequences join, first come first served, while the token budget, max_num_seqs and
   free blocks allow; leading full blocks found in the prefix cache are not recomputed.
3. The runner computes the chunks; sequences whose chunk ends at their last token sample one
   token; finished sequences free their blocks at once. A request with n > 1 choices samples
   n first tokens from its one prefill and forks: prompt blocks are shared by reference
   count, the last partial block is copied (if no block is free for the copy, the choice
   waits and recomputes, mostly from the prefix cache).

Roles. `both` (offline `LLM`, `pdserve worker --role both`) does all of the above. `prefill`
(P) stops each request after its first draw: the n first tokens come from one logits row
(no fork) and the blocks are held for the KV transfer until `release(rid)`. `decode` (D)
takes `reserve` (blocks for a prompt whose KV P will send) and `join` (the first tokens
from P: the choices start decoding from the transferred KV, or recompute it when the
transfer failed); the rest is the same continuous batching. `step()` returns one `SeqOutput`
per token drawn, which is what the workers stream.
"""

from __future__ import annotations

import enum
import itertools
import logging
import random
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from pdserve.engine.block_manager import prefix_block_hashes
from pdserve.engine.model_runner import SeqChunk
from pdserve.engine.sampler import Logprob, SampleResult, SampleRow
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Request, Sequence, SequenceStatus
from pdserve.engine.setup import EngineParts

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt leaves no room to generate within max_model_len."""


class Role(enum.Enum):
    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class SeqOutput:
    """One token drawn for one choice in one step."""

    request_id: str
    choice_index: int
    token_id: int
    logprobs: dict[int, Logprob] | None
    finish_reason: str | None  # "stop" | "length" | None


class LLMEngine:
    """Owns the sequences of one engine; `add_request` then `step` until `has_unfinished()` is
    False. Not thread-safe: one thread (the worker's step loop) calls everything."""

    def __init__(self, parts: EngineParts, role: Role = Role.BOTH):
        self.role = role
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
        self._seed_rng = random.Random(self.cfg.seed)  # seeds for requests that bring none
        self.num_preemptions = 0
        self.held: dict[str, Sequence] = {}  # P: prefilled, blocks kept for the transfer
        self.reserved: dict[str, Request] = {}  # D: blocks reserved, waiting for the KV
        self._outputs: list[SeqOutput] = []
        self.stalled = False  # the last step found nothing it could run (waiting on blocks)

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

    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams,
                    request_id: str | None = None, choice_index: int = 0) -> Request:
        """Queue one request (after `check_prompt`); its choices appear in `request.seqs`.

        `choice_index` > 0 runs that one choice of a request alone (params.n must be 1): the
        record a retry or failover re-submits draws exactly what that choice drew."""
        ids = [int(t) for t in prompt_token_ids]
        self.check_prompt(ids)
        if choice_index and params.n != 1:
            raise ValueError("choice_index > 0 needs SamplingParams.n == 1")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req = Request(request_id if request_id is not None else str(next(self._ids)), ids,
                      params, seed)
        self.waiting.append(self._new_sequence(req, choice_index))
        return req

    def _new_sequence(self, req: Request, choice: int) -> Sequence:
        seq = Sequence(seq_id=next(self._ids), request=req, choice_index=choice,
                       eos_token_ids=() if req.params.ignore_eos else self.eos_token_ids,
                       logprobs=[] if req.params.logprobs is not None else None)
        req.seqs.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Request) -> None:
        """Drop every choice of a request now; their blocks are freed (held and reserved
        blocks too)."""
        self.reserved.pop(req.request_id, None)
        held = self.held.pop(req.request_id, None)
        if held is not None and held.block_table:
            self.bm.free(held.block_table)
            held.block_table = []
        for seq in req.seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            self._finish(seq, "abort")

    # ---- P: prefill only -----------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """P: the KV transfer of a prefilled request ended (either way): free its blocks."""
        seq = self.held.pop(request_id, None)
        if seq is not None and seq.block_table:
            self.bm.free(seq.block_table)
            seq.block_table = []

    # ---- D: reservations -----------------------------------------------------------------

    def can_reserve(self, num_tokens: int) -> bool:
        return len(self.running) < self.cfg.max_num_seqs and self.bm.can_allocate(
            [0] * num_tokens, block_hashes=[])

    def reserve(self, prompt_token_ids: Seq[int], params: SamplingParams, request_id: str,
                seed: int, output_token_ids: Seq[int] = (), choice_index: int = 0) -> Request:
        """D: blocks for a prompt (and any output so far) whose KV P will send. Raises
        MemoryError if `can_reserve` is False. The request runs once `join`ed."""
        ids = [int(t) for t in prompt_token_ids]
        self.check_prompt(ids + list(output_token_ids))
        req = Request(request_id, ids, params, seed)
        seq = self._new_sequence(req, choice_index)
        seq.output_token_ids = list(output_token_ids)
        # no prefix lookup (block_hashes=[]): P fills every block
        seq.block_table = self.bm.allocate([0] * seq.num_tokens, block_hashes=[]).block_table
        self.reserved[request_id] = req
        return req

    def join(self, request_id: str, first: Seq[tuple[int, int, dict | None]],
             kv_ready: bool) -> None:
        """D: start the reserved request with P's first tokens, one (choice_index, token_id,
        logprobs) per choice still running. With kv_ready the prompt's KV is in the reserved
        blocks; otherwise (transfer failed) the sequence recomputes it in chunks under the
        step budget. A request none of whose choices still runs just frees its blocks."""
        req = self.reserved.pop(request_id)
        seq = req.seqs[0]
        if not first:
            self.bm.free(seq.block_table)
            seq.block_table = []
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "stop"
            return
        base = list(seq.output_token_ids)
        seq.block_hashes = prefix_block_hashes(seq.all_token_ids, self.block_size)
        seq.num_computed_tokens = seq.num_tokens if kv_ready else 0
        if kv_ready:
            self.bm.mark_computed(seq.block_table, seq.block_hashes, seq.num_computed_tokens)
        (c0, t0, lp0), rest = first[0], first[1:]
        seq.choice_index = c0
        self._append(seq, SampleResult(t0, lp0))
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        for choice, tok, lp in rest:
            child = self._fork(seq, choice) if kv_ready else self._new_sequence(req, choice)
            if child.status is SequenceStatus.WAITING and child not in self.waiting:
                self.waiting.append(child)
            child.output_token_ids = list(base)
            self._append(child, SampleResult(tok, lp))
        req.expected = len(first)  # finished choices never come to D

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[SeqOutput]:
        """Run one forward; returns every token drawn in it (with its finish reason)."""
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
        self.stalled = not scheduled
        if not scheduled:
            # D: reservations (or P: blocks held for transfers) may hold the blocks a waiting
            # sequence needs; they free them when their transfer ends. With none of those and
            # nothing running, nothing ever would: that is a bug, not a wait.
            if self.waiting and not (self.running or self.reserved or self.held):
                raise RuntimeError("no sequence fits in the KV pool (cannot happen: "
                                   "max_model_len is checked against the pool at start)")
            return []
        self._run(scheduled)
        out, self._outputs = self._outputs, []
        return out

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
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        sampling = [seq for (seq, _), c in zip(scheduled, chunks) if c.num_logits]
        # a request's first draw makes all n choices from the same logits row
        rows, row_of, owners = [], [], []
        for i, seq in enumerate(sampling):
            req = seq.request
            forking = (len(req.seqs) == 1 and req.params.n > 1 and not seq.output_token_ids
                       and req.expected is None)
            for choice in range(req.params.n) if forking else [seq.choice_index]:
                rows.append(self._sample_row(seq, choice))
                row_of.append(i)
                owners.append((seq, choice))
        results = self.parts.sampler(logits[row_of], rows) if rows else []
        if self.role is Role.PREFILL:
            self._prefilled(owners, results)
        else:
            # forks first: they share the parent's blocks before its first token can finish it
            order = sorted(range(len(owners)),
                           key=lambda k: owners[k][1] == owners[k][0].choice_index)
            for (seq, choice), res in ((owners[k], results[k]) for k in order):
                target = seq if choice == seq.choice_index else self._fork(seq, choice)
                self._append(target, res)
                reason = self._finish_reason(target.params, target.eos_token_ids, res.token,
                                             len(target.output_token_ids), target.num_tokens)
                self._emit(target, choice, res, reason)
                if reason:
                    self._finish(target, reason)
        for seq, _ in scheduled:
            if seq.status is SequenceStatus.RUNNING:
                seq.block_hashes = prefix_block_hashes(seq.all_token_ids, self.block_size,
                                                       seq.block_hashes)
                self.bm.mark_computed(seq.block_table, seq.block_hashes, seq.num_computed_tokens)

    def _prefilled(self, owners: list[tuple[Sequence, int]], results: list[SampleResult]) -> None:
        """P: report each choice's first token; hold the blocks for the KV transfer unless
        every choice already finished (then nothing goes to D)."""
        unfinished: dict[Sequence, bool] = {}
        for (seq, choice), res in zip(owners, results):
            reason = self._finish_reason(seq.params, seq.eos_token_ids, res.token,
                                         len(seq.output_token_ids) + 1, seq.num_tokens + 1)
            self._emit(seq, choice, res, reason)
            unfinished[seq] = unfinished.get(seq, False) or reason is None
        for seq, keep in unfinished.items():
            self.running.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "prefilled"
            seq.block_hashes = prefix_block_hashes(seq.all_token_ids, self.block_size,
                                                   seq.block_hashes)
            self.bm.mark_computed(seq.block_table, seq.block_hashes, seq.num_computed_tokens)
            if keep:
                self.held[seq.request.request_id] = seq
            else:
                self.bm.free(seq.block_table)
                seq.block_table = []

    def _emit(self, seq: Sequence, choice: int, res: SampleResult, reason: str | None) -> None:
        self._outputs.append(SeqOutput(seq.request.request_id, choice, res.token, res.logprobs,
                                       reason))

    def _sample_row(self, seq: Sequence, choice: int) -> SampleRow:
        req = seq.request
        return SampleRow(req.params, req.seed, choice, req.prompt_token_ids,
                         seq.output_token_ids,
                         tuple(seq.eos_token_ids) + tuple(req.params.stop_token_ids))

    def _append(self, seq: Sequence, res: SampleResult) -> None:
        seq.output_token_ids.append(res.token)
        if seq.logprobs is not None and res.logprobs is not None:
            seq.logprobs.append(res.logprobs)
            seq.cumulative_logprob += res.logprobs[res.token].logprob

    def _fork(self, parent: Sequence, choice: int) -> Sequence:
        """Choice `choice` of parent's request, sharing the parent's computed prompt blocks.
        Called before the parent's first output token is appended."""
        child = self._new_sequence(parent.request, choice)
        child.block_hashes = list(parent.block_hashes)
        n = parent.num_computed_tokens
        if parent.status is SequenceStatus.RUNNING and len(self.running) < self.cfg.max_num_seqs \
                and self.bm.can_fork(n):
            child.block_table, copy = self.bm.fork(parent.block_table, n)
            if copy is not None:
                self.parts.pool.copy_blocks([copy])
            child.num_computed_tokens = n
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            self.waiting.appendleft(child)  # recomputes; prompt blocks come from the prefix cache
        return child

    def _finish_reason(self, params: SamplingParams, eos: tuple[int, ...], token: int,
                       num_output: int, num_tokens: int) -> str | None:
        """Why a sequence stops after drawing `token` (counts include it), or None."""
        if token in eos or token in params.stop_token_ids:
            return "stop"
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return "length"
        if num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
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
