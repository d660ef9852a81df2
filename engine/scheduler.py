"""The scheduler: which tokens of which sequences run in each step, and every sequence's life
around it (admission, chunking, preemption, forks, finishing, the P/D role rules). It owns
block *ids* through the BlockManager and never touches a tensor: the engine (llm_engine.py)
runs what it schedules and hands back what was drawn. A step is three calls:

    batch = schedule()                 # [(sequence, tokens to compute this step)]
    draws = draws(batch)               # [(logits row, sequence, choice)] to sample after it
    rows = postprocess(batch, draws, results)   # tokens appended, finishes, TokenRows

Algorithm of `schedule()` (one forward per step):
1. Running sequences, oldest first, each schedule their pending tokens (the next prefill
   chunk, or the one token sampled last step) within the step's token budget
   (max_num_batched_tokens; mixed_step_tokens instead, if set, when a running sequence is
   past its prompt, i.e. decodes in this step, unless a prompt this engine prefills for
   another worker waits: a worker the proxy put in P's role prefills at full speed while
   its last streams drain, issue 21); if a sequence
   needs a block and none is free, the newest running sequence is preempted (blocks freed,
   recomputed later from its tokens so far) until it fits.
2. Waiting sequences join, first come first served, while the token budget, max_num_seqs and
   free blocks allow; leading full blocks found in the prefix cache are not recomputed.
3. (postprocess) Sequences whose chunk ended at their last token draw one token; finished
   sequences free their blocks at once. A request with n > 1 choices draws n first tokens
   from its one prefill and forks: prompt blocks are shared by reference count, the last
   partial block is copied (the copy is left in `copies` for the engine to run; if no block
   is free for it, the choice waits and recomputes, mostly from the prefix cache).

Roles. BOTH does all of the above. PREFILL (P) stops each request after its first draw: the
n first tokens come from one logits row (no fork) and the blocks are held for the KV
transfer until `release(rid)`. DECODE (D) takes `reserve` (blocks for a prompt whose KV P
will send) and `join` (P's first tokens: the choices start decoding from the transferred
KV, or recompute it when the transfer failed); the rest is the same continuous batching.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import deque
from collections.abc import Sequence as Seq

from pdserve.common.prefix import prefix_block_hashes
from pdserve.common.wire import Logprob, TokenRow
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger(__name__)

RUNNING, WAITING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.WAITING, \
    SequenceStatus.FINISHED


class PromptTooLongError(ValueError):
    """The prompt leaves no room to generate within max_model_len."""


class Role(enum.Enum):
    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


class Scheduler:
    """See the module docstring. Not thread-safe: one thread (the step loop) calls it."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, role: Role = Role.BOTH,
                 eos_token_ids: tuple[int, ...] = (), mixed_step_tokens: int | None = None):
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # the budget of a step that decodes (None: the same); see EngineConfig
        self.mixed_step_tokens = None if mixed_step_tokens is None else \
            min(mixed_step_tokens, max_num_batched_tokens)
        self.max_model_len = max_model_len
        self.role = role
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}  # P: prefilled, blocks kept for the transfer
        self.reserved: dict[str, Request] = {}  # D: blocks reserved, waiting for the KV
        self.copies: list[tuple[int, int]] = []  # (src, dst) block copies forks need
        self.num_preemptions = 0
        self.stalled = False  # the last schedule() found nothing it could run
        self._ids = itertools.count()
        # block tables whose free waits for a step still on the device (`defer_frees`)
        self._deferred: list[list[int]] | None = None

    # ---- requests ------------------------------------------------------------------------

    def check_length(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_tokens} tokens but max_model_len is {self.max_model_len}:"
                " at most max_model_len - 1 prompt tokens leave room for one output token")

    def add(self, req: Request, choice_index: int = 0) -> Sequence:
        """Queue a request's first sequence (choice `choice_index`; the others fork later)."""
        self.check_length(len(req.prompt_token_ids))
        seq = self._new_sequence(req, choice_index, req.prompt_token_ids)
        self.waiting.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Request) -> None:
        """Drop every choice of a request now; its blocks are freed (held and reserved too)."""
        self.reserved.pop(req.request_id, None)
        held = self.held.pop(req.request_id, None)
        if held is not None:
            self._free(held)
        for seq in req.seqs:
            if seq.status is not FINISHED:
                self._finish(seq, "abort")

    def release(self, request_id: str) -> None:
        """P: the KV transfer of a prefilled request ended (either way): free its blocks."""
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self._free(seq)

    def can_reserve(self, num_tokens: int) -> bool:
        return len(self.running) < self.max_num_seqs and self.bm.can_allocate(
            [0] * num_tokens, block_hashes=[])

    def reserve(self, req: Request, output_token_ids: Seq[int] = (), choice_index: int = 0
                ) -> None:
        """D: blocks for a prompt (and any output so far) whose KV P will send; MemoryError
        if `can_reserve` is False. The request runs once `join`ed."""
        self.check_length(len(req.prompt_token_ids) + len(output_token_ids))
        seq = self._new_sequence(req, choice_index, [*req.prompt_token_ids, *output_token_ids])
        req.prompt_logprobs_done = True  # P computes and delivers them
        # no prefix lookup (block_hashes=[]): P fills every block
        seq.block_table = self.bm.allocate(seq.token_ids, block_hashes=[]).block_table
        self.reserved[req.request_id] = req

    def join(self, request_id: str, first: Seq[TokenRow], kv_ready: bool) -> None:
        """D: start the reserved request with P's first token of each choice still running.
        With kv_ready the prompt's KV is in the reserved blocks; otherwise (the transfer
        failed) the sequence recomputes it in chunks under the step budget. A request none
        of whose choices still runs just frees its blocks."""
        req = self.reserved.pop(request_id)
        seq = req.seqs[0]
        if not first:
            self._free(seq)
            seq.status, seq.finish_reason = FINISHED, "stop"
            return
        base = list(seq.token_ids)  # prompt + output before P's token
        seq.num_computed_tokens = seq.num_tokens if kv_ready else 0
        if kv_ready:
            self._cache(seq)
        seq.choice_index = first[0].choice_index
        self._append(seq, first[0].token_id, first[0].logprobs)
        seq.status = RUNNING
        self.running.append(seq)
        for row in first[1:]:
            child = self._fork(seq, row.choice_index) if kv_ready \
                else self._new_sequence(req, row.choice_index, base)
            if child.status is WAITING and child not in self.waiting:
                self.waiting.append(child)
            self._append(child, row.token_id, row.logprobs)
        req.expected = len(first)  # finished choices never come to D

    # ---- a step --------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Sequence, int]]:
        """What runs next: (sequence, tokens to compute) in order, running ones first."""
        budget = self.max_num_batched_tokens
        if self.mixed_step_tokens is not None and any(
                seq.num_computed_tokens >= seq.num_prompt_tokens for seq in self.running) \
                and not any(seq.request.prefill_only
                            and seq.num_computed_tokens < seq.num_prompt_tokens
                            for seq in (*self.running, *self.waiting)):
            budget = self.mixed_step_tokens  # a stream decodes in this step: keep it short
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n):
                continue  # it preempted itself
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            seq.block_hashes = prefix_block_hashes(seq.token_ids, self.block_size,
                                                   seq.block_hashes, seq.request.cache_salt)
            # a prompt whose logprobs are asked for is computed in full: no cached blocks
            lookup = [] if seq.request.wants_prompt_logprobs else seq.block_hashes
            if not self.bm.can_allocate(seq.token_ids, block_hashes=lookup):
                break
            self.waiting.popleft()
            alloc = self.bm.allocate(seq.token_ids, block_hashes=lookup)
            seq.block_table, seq.num_computed_tokens = alloc.block_table, alloc.num_cached_tokens
            seq.status = RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            batch.append((seq, n))
            budget -= n
        self.stalled = not batch
        # D: reservations (or P: blocks held for transfers) may hold the blocks a waiting
        # sequence needs; they free them when their transfer ends. With none of those and
        # nothing running, nothing ever would: that is a bug, not a wait.
        if not batch and self.waiting and not (self.running or self.reserved or self.held):
            raise RuntimeError("no sequence fits in the KV pool (cannot happen: "
                               "max_model_len is checked against the pool at start)")
        return batch

    def draws(self, batch: list[tuple[Sequence, int]]) -> list[tuple[int, Sequence, int]]:
        """(logits row, sequence, choice) of each token to draw once `batch` ran: one row per
        sequence whose chunk reaches its last token, in batch order. A request's first draw
        makes all its n choices from the same row. Call before `postprocess`."""
        ending = [seq for seq, n in batch if seq.num_computed_tokens + n == seq.num_tokens]
        out = []
        for row, seq in enumerate(ending):
            req = seq.request
            forking = (len(req.seqs) == 1 and req.params.n > 1 and req.expected is None
                       and seq.num_tokens == seq.num_prompt_tokens)
            out += [(row, seq, c) for c in (range(req.params.n) if forking
                                            else [seq.choice_index])]
        return out

    def postprocess(self, batch: list[tuple[Sequence, int]],
                    draws: list[tuple[int, Sequence, int]],
                    results: Seq[tuple[int, dict[int, Logprob] | None]]) -> list[TokenRow]:
        """The step ran and `results[k]` = (token, logprobs) was drawn for `draws[k]`:
        append, fork, finish and cache; returns one TokenRow per token drawn."""
        for seq, n in batch:
            seq.num_computed_tokens += n
        out: list[TokenRow] = []
        if self.role is Role.PREFILL:
            self._prefilled(draws, results, out)
        else:
            # a both-role engine acting as P for some requests (flexible roles): those hand
            # their KV over after the first token, as on a prefill engine
            handoff = [k for k, d in enumerate(draws) if d[1].request.prefill_only]
            if handoff:
                self._prefilled([draws[k] for k in handoff], [results[k] for k in handoff],
                                out)
            # forks first: they share the parent's blocks before its first token can finish it
            order = sorted((k for k in range(len(draws)) if not draws[k][1].request.prefill_only),
                           key=lambda k: draws[k][2] == draws[k][1].choice_index)
            for k in order:
                _, seq, choice = draws[k]
                token, logprobs = results[k]
                target = seq if choice == seq.choice_index else self._fork(seq, choice)
                self._append(target, token, logprobs)
                reason = self._finish_reason(target, token, target.num_tokens)
                out.append(TokenRow(seq.request.request_id, choice, token, logprobs, reason))
                if reason:
                    self._finish(target, reason)
        for seq, _ in batch:
            if seq.status is RUNNING:
                self._cache(seq)
        return out

    # ---- asynchronous steps (the engine's look-ahead) -------------------------------------

    def defer_frees(self) -> list[list[int]]:
        """From now on freed block tables wait in the returned list instead of going back to
        the pool: a step on the device may still write them (a sequence that finished, or
        was aborted, after the step was launched). `free_deferred` releases them once that
        step is done."""
        self._deferred = []
        return self._deferred

    def free_deferred(self, tables: list[list[int]], *, stop: bool = False) -> None:
        """Return `tables` (a `defer_frees` list whose step is done) to the pool; `stop`:
        and free at once from now on (no step is on the device)."""
        for t in tables:
            self.bm.free(t)
        tables.clear()
        if stop:
            self._deferred = None

    def continue_decodes(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]] | None:
        """The next decode step of `seqs` (running, one token each) scheduled before their
        last token is known: each gets the slot of the token in flight. None, changing
        nothing, where that needs more free blocks than there are (the caller waits for the
        step and schedules as usual, which may preempt)."""
        bm = self.bm
        need = sum(max(0, bm.num_blocks_for(s.num_tokens + 1) - len(s.block_table))
                   for s in seqs)
        if need > bm.num_free_blocks:
            return None
        for s in seqs:
            bm.append(s.block_table, s.num_tokens + 1)
        self.stalled = False
        return [(s, 1) for s in seqs]

    # ---- internals -----------------------------------------------------------------------

    def _prefilled(self, draws: list[tuple[int, Sequence, int]],
                   results: Seq[tuple[int, dict[int, Logprob] | None]], out: list[TokenRow]
                   ) -> None:
        """P: report each choice's first token; hold the blocks for the KV transfer unless
        every choice already finished (then nothing goes to D)."""
        unfinished: dict[Sequence, bool] = {}
        for (_, seq, choice), (token, logprobs) in zip(draws, results):
            reason = self._finish_reason(seq, token, seq.num_tokens + 1)
            out.append(TokenRow(seq.request.request_id, choice, token, logprobs, reason))
            unfinished[seq] = unfinished.get(seq, False) or reason is None
        for seq, keep in unfinished.items():
            self.running.remove(seq)
            seq.status, seq.finish_reason = FINISHED, "prefilled"
            self._cache(seq)
            if keep:
                self.held[seq.request.request_id] = seq
            else:
                self._free(seq)

    def _new_sequence(self, req: Request, choice: int, token_ids: Seq[int]) -> Sequence:
        seq = Sequence(next(self._ids), req, list(token_ids), choice,
                       eos_token_ids=() if req.params.ignore_eos else self.eos_token_ids,
                       logprobs=[] if req.params.logprobs is not None else None)
        req.seqs.append(seq)
        return seq

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
        """Free the sequence's blocks; it recomputes its tokens so far when readmitted."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def _fork(self, parent: Sequence, choice: int) -> Sequence:
        """Choice `choice` of parent's request, sharing the parent's computed blocks (its
        tokens before the token just drawn for it, if any)."""
        n = parent.num_computed_tokens
        child = self._new_sequence(parent.request, choice, parent.token_ids[:n])
        child.block_hashes = list(parent.block_hashes)
        if parent.status is RUNNING and len(self.running) < self.max_num_seqs \
                and self.bm.can_fork(n):
            child.block_table, copy = self.bm.fork(parent.block_table, n)
            if copy is not None:
                self.copies.append(copy)
            child.num_computed_tokens = n
            child.status = RUNNING
            self.running.append(child)
        else:
            self.waiting.appendleft(child)  # recomputes; prompt blocks come from the prefix cache
        return child

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, Logprob] | None) -> None:
        seq.token_ids.append(token)
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob

    def _finish_reason(self, seq: Sequence, token: int, num_tokens: int) -> str | None:
        """Why `seq` stops once `token` is its last of `num_tokens` tokens, or None."""
        params = seq.params
        if token in seq.eos_token_ids or token in params.stop_token_ids:
            return "stop"
        if params.max_tokens is not None and num_tokens - seq.num_prompt_tokens >= params.max_tokens:
            return "length"
        return "length" if num_tokens >= self.max_model_len else None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table:
            self._cache(seq)  # its computed full blocks stay in the prefix cache after the free
            self._free(seq)
        seq.status, seq.finish_reason = FINISHED, reason

    def _cache(self, seq: Sequence) -> None:
        """Register `seq`'s full computed blocks in the prefix cache."""
        seq.block_hashes = prefix_block_hashes(seq.token_ids, self.block_size, seq.block_hashes,
                                               seq.request.cache_salt)
        self.bm.mark_computed(seq.block_table, seq.block_hashes, seq.num_computed_tokens)

    def _free(self, seq: Sequence) -> None:
        if seq.block_table:
            if self._deferred is not None:
                self._deferred.append(seq.block_table)
            else:
                self.bm.free(seq.block_table)
            seq.block_table = []
