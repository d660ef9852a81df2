"""The step loop of one engine: the scheduler (`scheduler.py`) decides, the model runner
computes, the sampler draws. `step()`: schedule -> one forward over every scheduled chunk
-> sample the rows whose chunk reached its sequence's last token -> postprocess -> the block
copies forks asked for; it returns one `TokenRow` per token drawn (what the workers stream).
The engine adds what needs the model: prompt checks against the vocabulary, seeds for
requests that bring none, the tensors, and containment (a request that makes the step fail
is found, aborted and reported in `failed`; the others run on). Roles (P, D) talk to
`self.scheduler` directly, except for `join`, whose forks copy blocks.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import weakref
from collections.abc import Sequence as Seq

import torch

from pdserve.common.params import SamplingParams
from pdserve.common.prefix import check_cache_salt
from pdserve.common.step_rates import StepRates
from pdserve.common.wire import Logprob, TokenRow
from pdserve.engine.model_runner import EngineDeadError, SeqChunk
from pdserve.engine.sampler import SampleResult, SampleRow, to_device
from pdserve.engine.scheduler import PromptTooLongError, Role, Scheduler  # noqa: F401 - re-exported
from pdserve.engine.sequence import Request, Sequence, SequenceStatus
from pdserve.engine.setup import EngineParts
from pdserve.engine.structured import Grammars

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3


class _Launched:
    """A decode step on the device whose tokens the host has not read yet (asynchronous
    scheduling): its batch (all single-token decodes), the sampled tokens [B] on the device,
    their copy on the way to the host, and the block tables freed while it may still write
    them."""

    def __init__(self, batch: list[tuple[Sequence, int]], tokens: torch.Tensor, started: float):
        self.batch = batch
        self.tokens = tokens
        self.deferred: list[list[int]] = []  # the scheduler's defer_frees() list
        self.started = started
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = tokens, None

    def wait(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class LLMEngine:
    """Owns the scheduler of one engine; `add_request` then `step` until `has_unfinished()`
    is False. Not thread-safe: one thread (the worker's step loop) calls everything."""

    def __init__(self, parts: EngineParts, role: Role = Role.BOTH):
        self.parts = parts
        self.bm = parts.block_manager
        self.max_model_len = parts.max_model_len
        eos = set(parts.model_config.eos_token_ids)
        if parts.tokenizer is not None and parts.tokenizer.eos_token_id is not None:
            eos.add(parts.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        cfg = parts.config
        self.scheduler = Scheduler(self.bm, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   mixed_step_tokens=cfg.mixed_step_tokens,
                                   max_model_len=self.max_model_len, role=role,
                                   eos_token_ids=self.eos_token_ids)
        self._ids = itertools.count()
        self._seed_rng = random.Random(cfg.seed)  # seeds for requests that bring none
        self.failed: list[tuple[str, str]] = []  # (request id, why): the caller drains it
        self._grammars: Grammars | None = None  # structured outputs, made on first use
        self._allowed: weakref.WeakKeyDictionary[Request, torch.Tensor] = \
            weakref.WeakKeyDictionary()
        self._failed_steps = 0  # steps in a row whose every request failed alone
        self.rates = StepRates()  # measured prefill rate and decode step time (load reports)
        mode = getattr(cfg, "async_scheduling", "auto")
        self.async_scheduling = mode == "on" or (mode == "auto" and parts.device.type == "cuda")
        self._launched: _Launched | None = None  # the decode step on the device, unread

    def check_prompt(self, ids: Seq[int], params: SamplingParams | None = None) -> None:
        """Raise ValueError for an empty prompt or token ids (of the prompt, or `params`'
        stop_token_ids) outside the vocabulary or a structured-output grammar that does not
        compile, and PromptTooLongError when the prompt leaves no room for one output token.
        What the proxy validated is checked again here."""
        vocab = self.parts.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        for what, bad in (("prompt token", [t for t in ids if not 0 <= t < vocab]),
                          ("stop_token_ids", [t for t in (params.stop_token_ids if params
                                                          else ()) if t >= vocab]),
                          ("allowed_token_ids", [t for t in (params.allowed_token_ids or ()
                                                             if params else ()) if t >= vocab]),
                          ("logit_bias", [t for t in ((params.logit_bias or {}) if params
                                                      else ()) if t >= vocab])):
            if bad:
                raise ValueError(f"{what} id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        self.scheduler.check_length(len(ids))
        if params is not None and params.structured is not None:
            self.grammars().compiled(params.structured)  # ValueError if it does not compile

    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams,
                    request_id: str | None = None, choice_index: int = 0,
                    cache_salt: str | None = None, token_mask=None,
                    prefill_only: bool = False) -> Request:
        """Queue one request (after `check_prompt`); its choices appear in `request.seqs`.

        `choice_index` > 0 runs that one choice of a request alone (params.n must be 1): the
        record a retry or failover re-submits draws exactly what that choice drew.
        `cache_salt` keeps its prefix-cache blocks apart from those of any other salt (or of
        none); it changes what is cached, never what is drawn. `token_mask` (see
        `Request.token_mask`) restricts each draw of each choice to the tokens it allows.
        `prefill_only`: this engine prefills the request for another (its first tokens are
        drawn here, then its blocks wait in `scheduler.held` for the KV transfer), whatever
        the engine's role: a both-role engine acting as P for one request."""
        ids = [int(t) for t in prompt_token_ids]
        self.check_prompt(ids, params)
        check_cache_salt(cache_salt)
        if choice_index and params.n != 1:
            raise ValueError("choice_index > 0 needs SamplingParams.n == 1")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req = Request(request_id if request_id is not None else str(next(self._ids)), ids,
                      params, seed, cache_salt=cache_salt, token_mask=token_mask,
                      prefill_only=prefill_only)
        self.scheduler.add(req, choice_index)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._launched is not None

    def abort(self, req: Request) -> None:
        self.scheduler.abort(req)

    def join(self, request_id: str, first: Seq[TokenRow], kv_ready: bool) -> None:
        """D: start a reserved request with P's first tokens (`Scheduler.join`)."""
        self.scheduler.join(request_id, first, kv_ready)
        self._copy_forks()

    def step(self) -> list[TokenRow]:
        """Run one forward; returns every token drawn in it (with its finish reason). With
        asynchronous scheduling a decode step returns the tokens of the step launched by the
        previous call, and leaves the next one running on the device (see below).

        A forward or draw that fails is contained: each request of the step runs alone, the
        ones that fail by themselves are aborted (blocks freed) and listed in `failed` for the
        caller to report, and the rest runs on. It raises only for the engine's own faults:
        no request fails alone, every request of several does, or MAX_FAILED_STEPS steps in
        a row failed whole."""
        if self._launched is not None:
            return self._step_ahead()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        started = time.perf_counter()
        if self.async_scheduling:
            try:
                if self._launch(batch, None, started):
                    return self._step_ahead()
            except Exception:  # noqa: BLE001 - the synchronous path below contains it
                logger.debug("asynchronous launch failed; the step runs synchronously",
                             exc_info=True)
        prefilling = [n for seq, n in batch if seq.num_computed_tokens < seq.num_prompt_tokens]
        prefill_tokens = sum(prefilling)
        try:
            draws, results = self._forward(batch)
            self._failed_steps = 0
        except EngineDeadError:
            raise  # no request's fault (a tensor-parallel rank died): nothing to contain
        except Exception as e:  # noqa: BLE001 - contained below, or re-raised
            batch = self._isolate(batch, e)
            draws, results = self._forward(batch) if batch else ([], [])
        out = self.scheduler.postprocess(batch, draws, results)
        self._copy_forks()
        if any(seq.request.wants_prompt_logprobs for seq, _ in batch):
            out = self._attach_prompt_logprobs(batch, out)
        self.rates.observe(prefill_tokens, len(batch), time.perf_counter() - started,
                           decodes=max(0, len(batch) - len(prefilling)))
        return out

    # ---- asynchronous decode steps -------------------------------------------------------
    #
    # Step N is launched (forward, LM head, draws) without reading its tokens; the next
    # step() call schedules N + 1 for the same sequences before N's tokens are known (each
    # gets the slot of the token in flight), launches it with N's tokens as inputs on the
    # device, and only then waits for N's tokens and postprocesses them: the host's work for
    # a step runs while the GPU computes the previous one. A sequence that N finishes (a
    # stop token) has one wasted row in N + 1, dropped; its blocks go back to the pool only
    # once N + 1 is done (`Scheduler.defer_frees`). Whatever else the next step would need
    # (admitting or joining requests, a row that needs the tokens so far, a preemption)
    # makes the engine wait for N first and schedule as usual.

    def _simple_row(self, seq: Sequence, output_position: int | None = None) -> SampleRow | None:
        """The draw of `seq`'s next token if it is simple (see `SampleRow.is_simple`) and
        the sequence may run ahead (decoding, no mask, no prompt logprobs, not handed to
        another worker); else None."""
        req = seq.request
        p = req.params
        if (req.token_mask is not None or p.allowed_token_ids is not None
                or p.structured is not None or req.prefill_only or req.wants_prompt_logprobs):
            return None
        row = self._sample_row(seq, seq.choice_index, output_position=output_position)
        return row if row.is_simple else None

    def _launch(self, batch: list[tuple[Sequence, int]], input_ids: torch.Tensor | None,
                started: float, ahead: bool = False) -> bool:
        """Launch `batch` (single-token decodes, one draw each, every draw simple) without
        reading its tokens; False, launching nothing, if the batch is not of that kind.
        `ahead`: the sequences' last token is still on the device (`input_ids`)."""
        rows = []
        for seq, n in batch:
            if n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens \
                    or seq.num_tokens <= seq.num_prompt_tokens:
                return False
            # ahead: the draw is for the output position after the token in flight
            pos = seq.num_tokens - seq.num_prompt_tokens + 1 if ahead else None
            row = self._simple_row(seq, pos)
            if row is None:
                return False
            rows.append(row)
        chunks = [SeqChunk((0,) if ahead else seq.token_ids[-1:], seq.num_tokens
                           - (0 if ahead else 1), seq.block_table) for seq, _ in batch]
        logits = self.parts.runner.execute(chunks, input_ids)
        launched = _Launched(batch, self.parts.sampler.draw(logits, rows), started)
        launched.deferred = self.scheduler.defer_frees()  # cannot fail: nothing leaks
        self._launched = launched
        return True

    def _step_ahead(self) -> list[TokenRow]:
        """Launch the step after the one on the device where it can run ahead; then read the
        launched step's tokens and postprocess them (see above)."""
        prev = self._launched
        self._launched = None
        started = time.perf_counter()
        launched = False
        seqs = self._continuing(prev)
        if seqs:
            batch = self.scheduler.continue_decodes(seqs)
            if batch is not None:
                where = {id(seq): i for i, (seq, _) in enumerate(prev.batch)}
                idx = to_device([where[id(seq)] for seq in seqs], torch.int64, prev.tokens.device)
                try:
                    launched = self._launch(batch, prev.tokens.index_select(0, idx), started,
                                            ahead=True)
                except Exception:  # noqa: BLE001 - run synchronously from here on
                    logger.exception("asynchronous step failed to launch; stepping "
                                     "synchronously from now on")
                    self.async_scheduling = False
        tokens = prev.wait()
        self.scheduler.free_deferred(prev.deferred, stop=not launched)
        # rows of sequences aborted or finished since the launch are dropped
        keep = [k for k, (seq, _) in enumerate(prev.batch)
                if seq.status is SequenceStatus.RUNNING]
        batch = [prev.batch[k] for k in keep]
        draws = [(i, seq, seq.choice_index) for i, (seq, _) in enumerate(batch)]
        out = self.scheduler.postprocess(batch, draws, [(tokens[k], None) for k in keep])
        self._copy_forks()
        self._failed_steps = 0
        self.rates.observe(0, len(batch), time.perf_counter() - prev.started,
                           decodes=len(batch))
        return out

    def _continuing(self, prev: _Launched) -> list[Sequence] | None:
        """The sequences the step after `prev` would decode, if it may run ahead: exactly
        the running ones, all of them in `prev`, none waiting to be admitted, minus those
        whose token in flight ends them by length. None otherwise."""
        sched = self.scheduler
        if not self.async_scheduling or sched.waiting or not sched.running:
            return None
        in_prev = {id(seq) for seq, _ in prev.batch}
        if any(id(seq) not in in_prev for seq in sched.running):
            return None  # joined, forked or readmitted since: schedule as usual
        seqs = []
        for seq in sched.running:
            n = seq.num_tokens + 1  # with the token in flight
            p = seq.params
            if (p.max_tokens is not None and n - seq.num_prompt_tokens >= p.max_tokens) \
                    or n >= self.max_model_len:
                continue  # that token is its last
            seqs.append(seq)
        budget = sched.max_num_batched_tokens if sched.mixed_step_tokens is None \
            else sched.mixed_step_tokens
        if not seqs or len(seqs) > min(budget, sched.max_num_seqs):
            return None
        return seqs

    @staticmethod
    def _attach_prompt_logprobs(batch: list[tuple[Sequence, int]], out: list[TokenRow]
                                ) -> list[TokenRow]:
        """The first row of each request whose prompt is computed carries its prompt
        logprobs (once)."""
        ready = {seq.request.request_id: seq.request for seq, _ in batch
                 if seq.request.wants_prompt_logprobs}
        for i, row in enumerate(out):
            req = ready.pop(row.request_id, None)
            if req is None:
                continue
            n = len(req.prompt_token_ids)
            plp = [None] + [req.prompt_logprobs.get(p) for p in range(1, n)]
            out[i] = TokenRow(row.request_id, row.choice_index, row.token_id, row.logprobs,
                              row.finish_reason, plp)
            req.prompt_logprobs_done = True
            req.prompt_logprobs = {}
        return out

    def _forward(self, batch: list[tuple[Sequence, int]]) -> tuple[list, list[SampleResult]]:
        """The model over `batch`'s chunks and the draws; changes no scheduler state (prompt
        logprobs are recorded by position on their request: a rerun writes the same)."""
        draws = self.scheduler.draws(batch)
        chunks, last_rows, full = [], [], []  # full: (sequence, first logits row, chunk)
        offset = 0
        for seq, n in batch:
            start = seq.num_computed_tokens
            ends = start + n == seq.num_tokens
            if seq.request.wants_prompt_logprobs and start < seq.num_prompt_tokens - 1:
                num_logits = n  # every position: its logits give the next token's logprob
                full.append((seq, offset, start, n))
            else:
                num_logits = int(ends)
            chunks.append(SeqChunk(seq.token_ids[start:start + n], start, seq.block_table,
                                   num_logits=num_logits))
            offset += num_logits
            if ends:
                last_rows.append(offset - 1)
        logits = self.parts.runner.execute(chunks)
        for seq, first_row, start, n in full:
            self._prompt_logprobs(seq, logits, first_row, start, n)
        grammar = [k for k, (_, seq, _) in enumerate(draws)
                   if seq.request.params.structured is not None]
        bitmasks: dict[int, torch.Tensor] = {}
        if grammar:  # every grammar row's mask at once (llguidance's threads)
            words = self.grammars().bitmasks([
                (draws[k][1].request, draws[k][1].request.params.structured, draws[k][2],
                 draws[k][1].token_ids[draws[k][1].num_prompt_tokens:]) for k in grammar])
            bitmasks = {k: words[j] for j, k in enumerate(grammar)}
        rows = [self._sample_row(seq, choice, bitmasks.get(k))
                for k, (_, seq, choice) in enumerate(draws)]
        return draws, self.parts.sampler(
            logits[[last_rows[r] for r, _, _ in draws]], rows) if rows else []

    @staticmethod
    def _prompt_logprobs(seq: Sequence, logits: torch.Tensor, first_row: int, start: int,
                         n: int) -> None:
        """Record the logprobs of the prompt tokens that positions [start, start + n) of
        `seq` predict (raw: log_softmax of the model's logits), on its request."""
        req = seq.request
        m = min(n, seq.num_prompt_tokens - 1 - start)  # positions whose next token is prompt
        if m <= 0:
            return
        lp = torch.log_softmax(logits[first_row:first_row + m].float(), dim=-1)
        targets = torch.tensor(seq.token_ids[start + 1:start + 1 + m], device=lp.device)
        own = lp.gather(1, targets[:, None])
        ranks = ((lp > own).sum(dim=1) + 1).tolist()
        own_list = own[:, 0].tolist()
        k = req.params.prompt_logprobs or 0
        top_v: list = []
        top_i: list = []
        if k:
            vals, ids = lp.topk(k, dim=-1)
            top_v, top_i = vals.tolist(), ids.tolist()
        for j in range(m):
            tok = seq.token_ids[start + 1 + j]
            entry = {tok: Logprob(own_list[j], ranks[j])}
            if k:
                for rank, (v, t) in enumerate(zip(top_v[j], top_i[j], strict=True), start=1):
                    entry.setdefault(t, Logprob(v, rank))
            req.prompt_logprobs[start + 1 + j] = entry

    def _isolate(self, batch: list[tuple[Sequence, int]], error: Exception
                 ) -> list[tuple[Sequence, int]]:
        """Find the requests of a failed step that fail alone; abort them; the rest."""
        parts: dict[Request, list[tuple[Sequence, int]]] = {}
        for seq, n in batch:
            parts.setdefault(seq.request, []).append((seq, n))
        culprits = {}
        for req, part in parts.items():
            try:
                self._forward(part)
            except EngineDeadError:
                raise
            except Exception as e:  # noqa: BLE001 - this request's own failure
                culprits[req] = f"{type(e).__name__}: {e}"
        self._failed_steps = self._failed_steps + 1 if len(culprits) == len(parts) else 0
        if not culprits or (len(culprits) == len(parts) > 1) \
                or self._failed_steps >= MAX_FAILED_STEPS:
            raise error
        for req, why in culprits.items():
            logger.warning("request %s failed the engine step; aborted: %s", req.request_id, why)
            self.scheduler.abort(req)
            self.failed.append((req.request_id, why))
        return [(seq, n) for seq, n in batch if seq.request not in culprits]

    def _copy_forks(self) -> None:
        # at once: D writes transferred KV into blocks outside step(), so a freed block
        # must not receive a late copy
        if self.scheduler.copies:
            self.parts.pool.copy_blocks(self.scheduler.copies)
            self.scheduler.copies = []

    def _allowed_mask(self, req: Request) -> torch.Tensor:
        """The bool [vocab] mask of `req`'s allowed_token_ids (made once per request)."""
        mask = self._allowed.get(req)
        if mask is None:
            mask = torch.zeros(self.parts.model_config.vocab_size, dtype=torch.bool)
            mask[req.params.allowed_token_ids] = True
            self._allowed[req] = mask
        return mask

    def grammars(self) -> Grammars:
        """The structured-output grammars of this engine (made on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.parts.tokenizer, self.parts.model_config.vocab_size,
                                      self.eos_token_ids)
        return self._grammars

    def _sample_row(self, seq: Sequence, choice: int, bitmask: torch.Tensor | None = None,
                    output_position: int | None = None) -> SampleRow:
        """`bitmask`: the row's grammar mask (structured outputs, `Grammars.bitmasks`);
        `output_position`: see `SampleRow` (an asynchronous step's draw)."""
        req = seq.request
        allowed = None
        if req.params.structured is None and req.token_mask is not None:
            allowed = req.token_mask(seq.token_ids[seq.num_prompt_tokens:])
        if req.params.allowed_token_ids is not None:
            only = self._allowed_mask(req)
            allowed = only if allowed is None else allowed & only
        return SampleRow(req.params, req.seed, choice, seq.token_ids, seq.num_prompt_tokens,
                         tuple(seq.eos_token_ids) + tuple(req.params.stop_token_ids), allowed,
                         bitmask, output_position)
