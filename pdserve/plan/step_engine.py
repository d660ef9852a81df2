"""The scheduler of a step-model engine, without sockets or clocks: what a fake engine
(bench/fake_worker.py --step-model) runs in wall time and what `pdserve plan` runs in
simulated time, so the two agree by construction on everything but the clock.

Each step: every decoding sequence gets one token, then prompt chunks fill the rest of the
step's token budget (`max_num_batched_tokens`; `mixed_step_tokens` when a stream decodes in
the step, unless a prompt prefilled for a D waits: as engine/scheduler.py) - requests
already running first, then new ones up to `max_num_seqs`, in arrival order; a prompt
whose last chunk ran gets its next token at the step's end. Its time is what the step model
(pdserve/plan/step_model.py) gives for those chunks and decodes. A job prefilled
for a D (a P's, or a both-role worker's acting as P) ends at its first token, then
holds its KV for the modelled transfer; a D's joined job decodes once its KV is in (one
modelled transfer after the Join). No preemption: the KV pool is reported, not enforced.

A job's `rec` is the request's record: `common/wire.py`'s RequestRecord, or anything with
its `request_id`, `prompt_token_ids` (its len), `output_token_ids`, `params.max_tokens` and
`choice_indices()`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pdserve.common.step_rates import StepRates
from pdserve.common.wire import TokenRow
from pdserve.plan.step_model import StepModel

KV_BLOCK = 16  # tokens per KV block, for the block counts in load reports


@dataclass(eq=False)
class Job:
    """One request on a step-model worker."""

    identity: Any  # who asked (the fake: the proxy's ZMQ identity)
    rec: Any  # the request's record (module docstring)
    left: dict[int, int]  # running choice -> tokens still to emit here
    prefill: int  # tokens to compute here before its next token (0: its KV came from P)
    tokens: Iterator[int] = field(repr=False)
    kv_len: int = 0  # tokens in its KV cache
    done: int = 0  # of `prefill`, computed
    kv: str | None = None  # P: D's KV address (None: nothing to move)
    ready: float = 0.0  # D: when its KV is in; P: when its transfer ends
    p: bool = False  # prefilled here for a D (a P's job, or a both-role worker's as P)

    @property
    def rid(self) -> str:
        return self.rec.request_id


@dataclass
class StepPlan:
    chunks: list[tuple[Job, int, int]]  # (job, new tokens, tokens cached before them)
    decodes: list[Job]
    seconds: float  # what the model says the step takes

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n, _ in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks) + sum(len(j.left) for j in self.decodes)


class StepEngine:
    """The scheduling and bookkeeping of a step-model worker, without sockets or clocks:
    `schedule()` picks a step and its modelled time, `complete(plan, now)` applies it and
    returns the rows it produced per job. See the module docstring for the policy."""

    def __init__(self, model: StepModel, role: str, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, transfer_s_per_token: float = 0.0,
                 mixed_step_tokens: int | None = None):
        self.model, self.role = model, role
        self.budget, self.max_seqs = max_num_batched_tokens, max_num_seqs
        # a step that decodes takes at most this many tokens (the engine's mixed_step_tokens)
        self.mixed_budget = self.budget if mixed_step_tokens is None else \
            min(mixed_step_tokens, self.budget)
        self.transfer_s_per_token = transfer_s_per_token
        self.jobs: dict[str, Job] = {}  # every job below, by request id
        self.waiting: deque[Job] = deque()  # not admitted yet
        self.running: dict[str, Job] = {}  # prefilling or decoding, in admission order
        self.timed: dict[str, Job] = {}  # D: awaiting its KV; P: its KV moving to D
        self.reserved: dict[str, tuple[Any, Any]] = {}  # D: Reserve, no Join yet (who, rec)

    def add(self, job: Job) -> None:
        """A job that computes here (`job.prefill` tokens) before its next token."""
        job.p = job.p or self.role == "prefill"  # a P's jobs all hand their KV over
        self.jobs[job.rid] = job
        self.waiting.append(job)

    def arrive(self, job: Job, now: float) -> None:
        """D: a joined job whose KV (`job.kv_len` tokens) comes from P."""
        job.ready = now + job.kv_len * self.transfer_s_per_token
        self.jobs[job.rid] = job
        self.timed[job.rid] = job

    def abort(self, rid: str) -> None:
        self.reserved.pop(rid, None)
        job = self.jobs.pop(rid, None)
        if job is not None:
            self.running.pop(rid, None)
            self.timed.pop(rid, None)
            if job in self.waiting:
                self.waiting.remove(job)

    def next_due(self) -> float | None:
        return min((j.ready for j in self.timed.values()), default=None)

    def due(self, now: float) -> list[Job]:
        """Timed jobs whose time came: D's start decoding (their KV is in: they run from
        the next step, as engine/scheduler.py's `join` puts a joined sequence straight into
        its running set, not behind the prompts waiting); P's transfers ended and are
        returned (to report)."""
        ended = [j for j in self.timed.values() if j.ready <= now]
        for j in ended:
            del self.timed[j.rid]
            if j.p:
                del self.jobs[j.rid]
            else:
                self.running[j.rid] = j
        return [j for j in ended if j.p]

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepPlan | None:
        budget = self.budget
        if any(j.done >= j.prefill for j in self.running.values()) and not any(
                j.p for j in (*self.waiting, *self.running.values()) if j.done < j.prefill):
            budget = self.mixed_budget  # a stream decodes in this step (engine/scheduler.py)
        decodes: list[Job] = []
        chunks: list[tuple[Job, int, int]] = []

        def take(job: Job) -> bool:
            nonlocal budget
            if job.done >= job.prefill:  # decoding: one token per running choice
                if len(job.left) > budget:
                    return False
                decodes.append(job)
                budget -= len(job.left)
                return True
            n = min(job.prefill - job.done, budget)
            if n <= 0:
                return False
            chunks.append((job, n, job.kv_len))
            budget -= n
            return True

        for job in sorted(self.running.values(), key=lambda j: j.done < j.prefill):
            take(job)  # decodes first, then the prompts already started
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            job = self.waiting[0]
            if not take(job):
                break
            self.waiting.popleft()
            self.running[job.rid] = job
        if not chunks and not decodes:
            return None
        contexts = [j.kv_len + 1 for j in decodes for _ in j.left]  # the new token's too
        seconds = self.model.batch_s([(n, ctx) for _, n, ctx in chunks], contexts)
        return StepPlan(chunks, decodes, seconds)

    def complete(self, plan: StepPlan, now: float) -> list[tuple[Job, list[TokenRow]]]:
        """Apply a step: chunks computed, one token per decoding choice and per prompt
        finished here. Jobs aborted meanwhile are skipped."""
        out = []
        for job, n, _ in plan.chunks:
            if self.running.get(job.rid) is not job:
                continue
            job.done += n
            job.kv_len += n
            if job.done >= job.prefill:
                out.append((job, self._first(job, now) if job.p else self._emit(job)))
        for job in plan.decodes:
            if self.running.get(job.rid) is job:
                job.kv_len += 1
                out.append((job, self._emit(job)))
        return out

    def _emit(self, job: Job) -> list[TokenRow]:
        tok = next(job.tokens)
        rows = []
        for c in list(job.left):
            job.left[c] -= 1
            rows.append(TokenRow(job.rid, c, tok, None, None if job.left[c] else "length"))
            if not job.left[c]:
                del job.left[c]
        if not job.left:
            del self.running[job.rid]
            del self.jobs[job.rid]
        return rows

    def _first(self, job: Job, now: float) -> list[TokenRow]:
        """P: the first token of every choice; the KV then moves to D (or is freed)."""
        last = (job.rec.params.max_tokens or 16) <= 1
        tok = next(job.tokens)
        rows = [TokenRow(job.rid, c, tok, None, "length" if last else None) for c in job.left]
        del self.running[job.rid]
        if job.kv is not None and not last:
            self.arrive(job, now)  # held until its transfer ends
        else:
            del self.jobs[job.rid]
        return rows

    def pending_prefill_tokens(self) -> int:
        return sum(j.prefill - j.done for j in (*self.waiting, *self.running.values()))

    def held_tokens(self) -> int:
        """KV tokens held: running and timed jobs, and D's reservations (the prompt's)."""
        held = sum(j.kv_len for j in self.running.values())
        held += sum(j.kv_len for j in self.timed.values())
        return held + sum(len(rec.prompt_token_ids) for _, rec in self.reserved.values())


def engine_load(e: StepEngine, role: str, capacity: int, rates: StepRates) -> dict[str, Any]:
    """The counts of a load report (a real worker's keys) for a step-model engine: requests
    running and waiting, queued prompt tokens, KV usage against `capacity` tokens, the
    measured step rates; a P's KV blocks awaiting transfer."""
    held = e.held_tokens()
    waiting = len(e.waiting) + len(e.reserved) + sum(not j.p for j in e.timed.values())
    load: dict[str, Any] = {
        "role": role, "num_requests_running": len(e.running), "num_requests_waiting": waiting,
        "num_requests_decoding": sum(j.done >= j.prefill for j in e.running.values()),
        "pending_prefill_tokens": e.pending_prefill_tokens(),
        "kv_cache_usage_perc": min(1.0, held / capacity),
        "num_free_blocks": max(0, capacity - held) // KV_BLOCK, **rates.as_load()}
    if role != "decode":
        load["blocks_awaiting_transfer"] = sum(-(-j.kv_len // KV_BLOCK)
                                               for j in e.timed.values() if j.p)
    return load
