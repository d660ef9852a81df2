"""`ClusterBackend`: the `Backend` that routes each request over P/D pairs (or both-role
workers) through the data path, with retries and failover.

Per request: compute the prompt's block hashes (the same function and block size as the
workers' prefix caches) -> route: with P and D available, pick D first (room, queue, then
power of two choices), then P (longest cached prefix if not overloaded, else power of two
choices, avoiding P->D links whose circuit breaker is open); a prompt shorter than
`min_pd_prompt_tokens`, or mostly cached on the chosen D, skips P and D prefills it itself
(with `placement="slo"`, proxy/placement.py's estimates choose between P and D instead, per
request, once both sides have measured their steps);
without P/D pairs, a both-role worker serves it (with P's, both-role workers are D's too:
they take a P's KV as D's do; with `placement="slo"` they are P's for one another too:
flexible roles, where D and P are chosen together, `_place_flexible`); a request that ends at its first token
(max_tokens 1) goes to P alone when there is one -> stream the rows as `ChoiceDelta`s.
Failures: before the first token, retry on other workers (up to `max_retries`); a D that
dies mid-stream has each unfinished choice re-submitted (prompt + output so far) to another
D, which continues the same draws; a failed KV transfer is recomputed by D (counted) and
feeds the P->D link's breaker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from pdserve.common.prefix import prefix_block_hashes
from pdserve.common.stats_line import Totals
from pdserve.common.wire import RequestRecord, TokenRow
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proxy import metrics, placement
from pdserve.proxy.admission import Admission, OverloadedError
from pdserve.proxy.backend import (
    BackendError,
    ChoiceDelta,
    GenerationRequest,
    RequestFailedError,
    to_deltas,
)
from pdserve.proxy.placement import SLO
from pdserve.proxy.registry import Registry, Worker
from pdserve.proxy.workers import WorkerError, run_both, run_pd, run_prefill_only, run_resume

logger = logging.getLogger(__name__)

BREAKER_THRESHOLD = 3  # consecutive failed transfers that open a P->D link
BREAKER_OPEN_S = 30.0
AFFINITY_SLACK = 2.0  # a cached prefix wins unless its worker is this much busier
NO_WORKER_WAIT_S = 10.0  # with no worker able to serve, how long a request waits for one


def _chunk_budget(w: Worker, beside_streams: bool | None = None) -> int:
    """The prompt tokens a worker's next step takes (its /info limits): the full step budget,
    or `mixed_step_tokens` when the step also decodes its streams (`beside_streams`; None:
    whether its load report says streams decode now)."""
    limits = w.info.get("limits", {})
    full = int(limits.get("max_num_batched_tokens", 2048))
    if beside_streams is None:
        beside_streams = placement.streams(w.load) > 0
    return min(full, int(limits.get("mixed_step_tokens") or full)) if beside_streams else full


# a both-role worker keeps P's role until the pool went this many TTFT bounds without pairing
# two workers: the first mixed steps at a small batch look affordable even where the pool's
# load will make them dear (pdserve plan's simulator, H200 fit, 58 req/s: releasing at once
# spread the early streams over both workers, and the one that took P's role again kept
# mixing their decodes into its prefill steps for their whole outputs)
HOLD_TTFTS = 2.0


def _running(w: Worker, load: dict[str, Any]) -> int:
    """A worker's streams, and the requests on their way that its report does not count."""
    return placement.streams(load) + w.link.in_flight()[0]


class ClusterBackend:
    """See the module docstring. `await start()` before serving; `await close()` after."""

    def __init__(self, registry: Registry, tokenizer: Tokenizer | None, model_name: str, *,
                 model_path: str | None = None, min_pd_prompt_tokens: int = 16,
                 skip_p_cached_fraction: float = 0.8, max_retries: int = 2,
                 request_timeout: float = 600.0, max_queued_requests: int = 1024,
                 max_queue_delay: float = 20.0,
                 local_workers: Callable[[], list[dict[str, Any]]] | None = None,
                 placement: str = "threshold", slo: SLO = SLO(1.0, 0.025)):
        self.registry = registry
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_path = model_path
        self.min_pd_prompt_tokens = min_pd_prompt_tokens
        self.skip_p_cached_fraction = skip_p_cached_fraction
        if placement not in ("threshold", "slo"):
            raise ValueError(f"placement must be threshold or slo, got {placement!r}")
        self.placement, self.slo = placement, slo
        registry.flexible_roles = placement == "slo"  # both-role workers prefill for others
        self._queued_tokens = 0  # prompt tokens of the requests waiting for a route here
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.local_workers = local_workers  # a local cluster's supervisor record, for /health
        self._max_model_len = 0
        self._vocab_size = 0
        self._rng = random.Random()
        self._held_p: set[str] = set()  # --placement slo: both-role workers in P's role
        self._last_pd = -math.inf  # when a flexible placement last paired two workers
        self.clock = time.monotonic  # (pdserve plan's simulator runs its own)
        self._breakers: dict[tuple[str, str], tuple[int, float]] = {}
        self._pairs: dict[str, tuple[str, str]] = {}  # rid -> (P url, D url) awaiting TRANSFER
        self.admission = Admission(max_queued_requests, max_queue_delay)
        registry.on_transfer, registry.on_report = self._on_transfer, self.admission.wake
        self._attempt = itertools.count(1)
        # totals for the proxy's stats line (`totals`)
        self.prompt_tokens = self.generation_tokens = self.running = 0

    def totals(self) -> Totals:
        """Prompt tokens routed and tokens streamed since start, requests generating and
        waiting for room, and the workers routable now (the proxy's stats line)."""
        roles = ", ".join(f"{len(self.registry.usable(r))} {name}" for r, name in (
            ("prefill", "P"), ("decode", "D"), ("both", "both-role")) if
            any(w.role == r for w in self.registry.workers))
        return Totals(self.prompt_tokens, self.generation_tokens, self.running,
                      self.admission.waiting, f", usable workers: {roles or 'none'}")

    async def start(self) -> None:
        """Begin health checks; workers are admitted as they answer (see Registry)."""
        self.registry.start()

    async def wait_ready(self, timeout: float) -> bool:
        """Whether a worker was admitted (accepted, healthy, linked: not merely its /info
        read), waiting (at most `timeout`) only for the first two rounds of health checks
        (one health interval apart): a request that comes while no worker can serve gets
        its 503 within about a second, with the reason, instead of hanging (issue 18); one
        that comes between a worker's /info and its /health answer waits for that answer (a
        just-started proxy process), and a first check that failed on a loaded host gets a
        second before anyone hears "nobody serves" (a second proxy process under
        --api-server-count answered 503 so in CI)."""
        reg = self.registry
        if not reg.checked.is_set() and not reg.admitted.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (reg.checked, reg.admitted)]
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits:
                    t.cancel()
        return reg.admitted.is_set()

    @property
    def max_model_len(self) -> int:
        """The smallest max_model_len of the admitted workers (0 until one is admitted:
        workers that come up after the proxy are picked up when they do)."""
        if not self._max_model_len:
            self._max_model_len = self.registry.max_model_len()
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        if not self._vocab_size:
            sizes = [w.info["vocab_size"] for w in self.registry.workers
                     if w.info.get("vocab_size") and w.refused is None]
            self._vocab_size = min(sizes) if sizes else 0
        return self._vocab_size

    async def close(self) -> None:
        await self.registry.close()

    async def health(self) -> dict[str, Any]:
        report = {"healthy": self.registry.ready(), "serves": self.registry.serves(),
                  "workers": self.registry.snapshot()}
        if self.local_workers is not None:
            report["local_workers"] = self.local_workers()
        return report

    # ---- routing -------------------------------------------------------------------------

    def _on_transfer(self, rid: str, ok: bool, reason: str) -> None:
        pair = self._pairs.pop(rid, None)
        if pair is None:
            return
        if ok:
            self._breakers.pop(pair, None)
            return
        metrics.TRANSFER_FAILURES.inc()
        count, _ = self._breakers.get(pair, (0, 0.0))
        count += 1
        until = time.monotonic() + BREAKER_OPEN_S if count >= BREAKER_THRESHOLD else 0.0
        self._breakers[pair] = (count, until)
        logger.warning("KV transfer %s -> %s failed (%s); D recomputed", *pair, reason)

    def _link_open(self, p: Worker, d: Worker) -> bool:
        _, until = self._breakers.get((p.url, d.url), (0, 0.0))
        return until <= time.monotonic()

    def _pick(self, cands: list[Worker], hashes: list[int]) -> Worker:
        best = min(cands, key=lambda w: w.score())
        cached = max(cands, key=lambda w: w.cached_blocks(hashes))
        if cached.cached_blocks(hashes) > 0 and cached.score() <= best.score() + AFFINITY_SLACK:
            return cached
        if len(cands) == 1:
            return cands[0]
        a, b = self._rng.sample(cands, 2)  # power of two choices
        return a if a.score() <= b.score() else b

    def _route(self, req: RequestRecord, exclude: set[str], hashes: list[int]
               ) -> tuple[str, Worker, Worker | None] | None:
        """A route whose workers have room now, None if every candidate is busy (the request
        waits in the admission queue); BackendError if no worker can serve it at all."""
        reg = self.registry
        usable = {r: [w for w in reg.usable(r) if w.url not in exclude]
                  for r in ("prefill", "decode", "both")}
        if not usable["decode"] and not usable["both"]:
            raise BackendError("no healthy worker can serve this request (need a prefill/decode "
                               "pair, a decode worker or a both-role worker)")
        # the workers that can prefill for another: P's, and with flexible roles (placement
        # slo) both-role workers (flexible: they prefill for a D as P's do)
        flexible = [w for w in usable["both"] if w.info.get("acts_as_prefill")] \
            if reg.flexible_roles else []
        # the workers that can decode what a P prefilled: D's, and with P's usable the
        # both-role workers too (they take Reserve + Join as D's do: a mixed pool), or with
        # flexible roles each other's prompts
        d_capable = usable["decode"] + ([w for w in usable["both"]
                                         if isinstance(w.info.get("kv_address"), str)]
                                        if usable["prefill"] or len(flexible) > 1 else [])
        ps, ds, boths = ([w for w in cands if w.has_room()]
                         for cands in (usable["prefill"], d_capable, usable["both"]))
        ids = req.prompt_token_ids
        if req.params.max_tokens == 1 and usable["prefill"]:
            # it ends at its first token: P alone, no reservation on D, no transfer
            if not ps:
                return None
            p = self._pick(ps, hashes)
            p.assign(req.request_id, hashes, len(ids))
            return "p_only", p, None
        if d_capable:
            if not ds:
                return None
            d = self._pick(ds, hashes)
            short = len(ids) < self.min_pd_prompt_tokens
            bs = reg.reference.get("block_size", 16)
            mostly_cached = d.cached_blocks(hashes) * bs >= self.skip_p_cached_fraction * len(ids)
            use_p = bool(usable["prefill"]) and not short and not mostly_cached
            p_best: Worker | None = None
            chosen: placement.Estimate | None = None
            prefills = [p for p in usable["prefill"] + flexible if p is not d]
            if self.placement == "slo" and len(flexible) > 1 and not usable["prefill"] \
                    and all(w.role == "both" for w in ds):
                # a pool of both-role workers: choose D and P together
                opt = self._place_flexible(flexible, ds, d, len(ids), hashes, bs)
                if opt is not None:
                    chosen, p_best, d, use_p = opt.est, opt.p, opt.d, opt.p is not None
                elif not short and not mostly_cached and (pair := self._unmeasured_pair(
                        flexible, ds)) is not None:
                    p_best, d = pair
                    use_p = True
            elif self.placement == "slo" and prefills:
                chosen, p_best = self._place(prefills, d, len(ids), hashes, bs)
                if chosen is not None:
                    use_p = chosen.route == "pd"
            if use_p:
                if p_best is not None:  # the estimates chose this P: wait for its room
                    if not p_best.has_room():
                        return None
                    p = p_best
                else:
                    ps_ok = [p for p in ps if self._link_open(p, d)] or ps
                    if not ps_ok:
                        return None
                    p = self._pick(ps_ok, hashes)
                p.assign(req.request_id, hashes, len(ids))
                d.assign(req.request_id, [], len(ids))
                self._count_placement(chosen, "pd")
                return "pd", p, d
            d.assign(req.request_id, hashes, len(ids))
            self._count_placement(chosen, "skip_p")
            return ("both" if d.role == "both" and not usable["prefill"] else "skip_p"), d, None
        if not boths:
            return None
        w = self._pick(boths, hashes)
        w.assign(req.request_id, hashes, len(ids))
        return "both", w, None

    def _count_placement(self, chosen: placement.Estimate | None, route: str) -> None:
        if self.placement != "slo":
            return
        if chosen is None:
            metrics.child(metrics.PLACEMENTS, route, "no_estimate").inc()
            return
        metrics.child(metrics.PLACEMENTS, route, "slo").inc()
        metrics.PLACEMENT_TTFT.observe(chosen.ttft_s)

    def _place(self, prefills: list[Worker], d: Worker, num_tokens: int, hashes: list[int],
               block_size: int) -> tuple[placement.Estimate | None, Worker | None]:
        """--placement slo: the chosen estimate ("pd" or "skip_p") from proxy/placement.py
        over the usable P's (links not broken) and the chosen D, with the P it names (None
        for skip_p); (None, None) when a side has not measured its steps (the
        prompt-length rule decides)."""
        def todo(w: Worker) -> int:  # tokens to compute: the cached prefix is not
            return max(1, num_tokens - w.cached_blocks(hashes) * block_size)

        budget = _chunk_budget
        # the prompts waiting here for a route count as P's queue: admission lets none
        # overtake, so a P-bound backlog delays every request behind the first; charging
        # it to P sends prompts to D while P cannot clear it within the SLO
        backlog = max(0, self._queued_tokens - num_tokens)

        def on_p(p: Worker) -> placement.Estimate | None:
            routed = p.link.in_flight()[1] + backlog
            if p.role == "both":  # prefills beside its own decodes
                return placement.on_shared_p(p.load, routed, todo(p), budget(p))
            return placement.on_p(p.load, routed, todo(p))

        ests = [(e, p) for p in prefills if self._link_open(p, d)
                for e in [on_p(p)] if e is not None]
        p_est, p_best = max(ests, key=lambda x: x[0].headroom(self.slo)) if ests else (None, None)
        d_est = placement.on_d(d.load, d.link.in_flight()[1], todo(d), budget(d),
                               fallback_rate=p_best.load.get("prefill_tokens_per_s")
                               if p_best is not None else None)
        chosen = placement.decide(p_est, d_est, self.slo,
                                  shared_p=p_best is not None and p_best.role == "both")
        if chosen is None:
            return None, None
        return chosen, (p_best if chosen.route == "pd" else None)

    def _place_flexible(self, flexible: list[Worker], ds: list[Worker], preferred: Worker,
                        num_tokens: int, hashes: list[int], block_size: int
                        ) -> placement.Option | None:
        """--placement slo over both-role workers: every D with room, prefilling itself or
        fed by each other worker (links not broken), judged together
        (`placement.decide_flexible`); None while a worker has not measured its steps."""
        def todo(w: Worker) -> int:
            return max(1, num_tokens - w.cached_blocks(hashes) * block_size)

        budget = _chunk_budget
        backlog = max(0, self._queued_tokens - num_tokens)  # as in _place
        loads = placement.borrowed_loads({w.url: w.load for w in flexible})
        as_p: dict[str, placement.Estimate | None] = {
            p.url: placement.on_shared_p(loads[p.url], p.link.in_flight()[1] + backlog,
                                         todo(p), budget(p)) for p in flexible}
        options: list[placement.Option] = []
        for d in ds:
            load = loads.get(d.url, d.load)
            gap = placement.mixed_gap_s(load, _chunk_budget(d, beside_streams=True))
            streams = _running(d, load)
            sustains = gap is None or gap <= placement.SUSTAIN_FRACTION * self.slo.itl_s
            whole = placement.on_d(load, d.link.in_flight()[1], todo(d), budget(d))
            if whole is None:
                return None
            options.append(placement.Option(whole, d, None, streams, sustains))
            for p in flexible:
                est = as_p[p.url]
                if p is d or not self._link_open(p, d):
                    continue
                if est is None:
                    return None
                options.append(placement.Option(est, d, p, streams, sustains))
        # a worker chosen to prefill for another keeps P's role (no new decodes) until a
        # worker collocates again (measured to pay, HOLD_TTFTS after the last pairing): its
        # streams drain and its steps become prompt-only
        # (without this, both workers kept taking decodes and prompt chunks alike)
        self._held_p &= {w.url for w in flexible}  # workers gone from the pool are not held
        # until some worker has run a mixed step, nobody knows what collocating costs:
        # whole requests gather on one worker (which measures it) and the others stay
        # clean for P's role should it prove costly
        pack = all(w.load.get("mixed_prefill_tokens_per_s") is None for w in flexible)
        opt = placement.decide_flexible(
            [o for o in options if o.d.url not in self._held_p] or options, self.slo, preferred,
            pack)
        if opt is not None:
            now = self.clock()
            if opt.p is not None:
                self._held_p.add(opt.p.url)
                self._last_pd = now
            elif opt.sustains and not pack and now - self._last_pd >= HOLD_TTFTS * self.slo.ttft_s:
                self._held_p.clear()
            metrics.PLACEMENT_P_ROLE.set(len(self._held_p))
        return opt

    def _unmeasured_pair(self, flexible: list[Worker], ds: list[Worker]
                         ) -> tuple[Worker, Worker] | None:
        """(P, D) for a flexible pool that has measured nothing yet: disaggregated from the
        first request, the worker running the fewest streams prefilling (and held in P's
        role) for the one running the most, so no worker collects streams that would later
        turn every step of its P's role into a mixed one (on the step-model simulator the
        first second's requests spread over both workers cost the pool's P ~10% of its
        rate for as long as their outputs ran). The first steps measure both sides; None
        when no P has room or no other D is there (the caller's rule then applies)."""
        def running(w: Worker) -> int:
            return _running(w, w.load)

        ps = [w for w in flexible if w.has_room()]
        if not ps:
            return None
        p = min(ps, key=lambda w: (w.url not in self._held_p, running(w), w.url))
        others = [w for w in ds if w is not p and self._link_open(p, w)]
        if not others:
            return None
        self._held_p.add(p.url)
        self._last_pd = self.clock()
        metrics.PLACEMENT_P_ROLE.set(len(self._held_p))
        return p, max(others, key=lambda w: (running(w), w.url))

    @staticmethod
    def _release(route: tuple[str, Worker, Worker | None], rid: str) -> None:
        for w in route[1:]:
            if w is not None:
                w.release(rid)

    async def _admit(self, rec: RequestRecord, exclude: set[str], hashes: list[int],
                     deadline: float) -> tuple[str, Worker, Worker | None]:
        """A route with room: now, or from the admission queue (a 429 past `deadline`). When
        no worker can serve at all, wait up to NO_WORKER_WAIT_S for one to be (re)admitted:
        a worker restarting or a health check racing a burst is not a 503 at once (but a
        cluster that never could serve is)."""
        end = time.monotonic() + NO_WORKER_WAIT_S
        while True:
            try:
                return await self.admission.admit(
                    rec.priority, deadline, lambda: self._route(rec, exclude, hashes),
                    lambda route: self._release(route, rec.request_id))
            except OverloadedError:
                raise
            except BackendError:
                left = end - time.monotonic()
                # never able to serve (a D unreachable from the start): no use waiting
                if left <= 0 or not (self.registry.served_once or self.registry.ready()):
                    raise
                await self.admission.changed(left)  # a worker admitted or back: try again

    # ---- serving -------------------------------------------------------------------------

    def _stream(self, route: str, a: Worker, b: Worker | None,
                rec: RequestRecord) -> AsyncIterator[list[TokenRow]]:
        metrics.child(metrics.ROUTES, route).inc()
        for w in (a, b):
            if w is not None:
                metrics.child(metrics.WORKER_REQUESTS, w.url, w.role).inc()
        if route == "pd":
            self._pairs[rec.request_id] = (a.url, b.url)
            kv = b.info.get("kv_address")
            return run_pd(rec, a.link, b.link, self.request_timeout,
                          kv if isinstance(kv, str) else None)
        if route == "p_only":
            return run_prefill_only(rec, a.link, self.request_timeout)
        return run_both(rec, a.link, self.request_timeout)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        start = time.monotonic()
        outputs: dict[int, list[int]] = {}
        finished: set[int] = set()
        stamps: dict[int, float] = {}
        exclude: set[str] = set()
        rec, attempt, engine_failures = req, 0, 0
        d_worker: Worker | None = None
        bs = self.registry.reference.get("block_size", 16) if self.registry.reference else 16
        hashes = prefix_block_hashes(req.prompt_token_ids, bs, cache_salt=req.cache_salt)
        deadline = start + self.admission.max_delay  # of waiting for room, 429 after it
        self.running += 1
        try:
            while True:
                self._queued_tokens += len(req.prompt_token_ids)
                try:
                    route, a, b = await self._admit(rec, exclude, hashes, deadline)
                finally:
                    self._queued_tokens -= len(req.prompt_token_ids)
                if attempt == 0 and rec is req:
                    self.prompt_tokens += len(req.prompt_token_ids)
                d_worker, rid = b if route == "pd" else a, rec.request_id
                try:
                    async for rows in self._stream(route, a, b, rec):
                        yield self._deliver(rows, outputs, finished, stamps, start)
                    break
                except WorkerError as e:
                    if not e.retryable:  # the worker refused the request: the client's fault
                        raise ValueError(str(e)) from e
                    if e.code == "busy":  # full since its last report (the link knows): wait
                        rec = replace(req,
                                      request_id=f"{req.request_id}#{next(self._attempt)}")
                        continue
                    if e.code == "draining" and not outputs:  # it drains itself (SIGTERM),
                        # which its next health check would say: elsewhere, no retry spent
                        for w in (a, b):
                            if w is not None and w.link is e.link:
                                self.registry.drains_itself(w)
                                exclude.add(w.url)
                        rec = replace(req,
                                      request_id=f"{req.request_id}#{next(self._attempt)}")
                        continue
                    engine_failures += e.code == "engine"
                    if engine_failures >= 2:  # it fails engines: a third would fail too
                        raise RequestFailedError(
                            f"the request failed on two workers: {e}") from e
                    if outputs:  # tokens already streamed: continue each choice elsewhere
                        exclude.add(d_worker.url)
                        async for deltas in self._failover(req, outputs, finished, exclude,
                                                           stamps, start):
                            yield deltas
                        break
                    attempt += 1
                    if attempt > self.max_retries:
                        raise BackendError(f"no worker could serve the request: {e}") from e
                    metrics.RETRIES.inc()
                    # only the worker that failed: its partner of the pair may serve the retry
                    failed = [w for w in (a, b) if w is not None and w.link is e.link]
                    exclude.update(w.url for w in failed or (a, b) if w is not None)
                    rec = replace(req,
                                  request_id=f"{req.request_id}#{next(self._attempt)}")
                    logger.warning("retrying %s elsewhere: %s", req.request_id, e)
                finally:
                    self._release((route, a, b), rid)
                    self._pairs.pop(rid, None)
                    self.admission.wake()  # a request ended or moved: room, maybe
        finally:
            self.running -= 1

    def _deliver(self, rows: list[TokenRow], outputs: dict[int, list[int]], finished: set[int],
                 stamps: dict[int, float], start: float) -> list[ChoiceDelta]:
        now = time.monotonic()
        self.generation_tokens += len(rows)
        for r in rows:
            toks = outputs.setdefault(r.choice_index, [])
            toks.append(r.token_id)
            if len(toks) == 1:
                metrics.TTFT.observe(now - start)
            elif len(toks) == 2:
                metrics.TOKEN2.observe(now - stamps[r.choice_index])
            else:
                metrics.ITL.observe(now - stamps[r.choice_index])
            stamps[r.choice_index] = now
            if r.finish_reason is not None:
                finished.add(r.choice_index)
        return to_deltas(rows)

    async def _failover(self, req: GenerationRequest, outputs: dict[int, list[int]],
                        finished: set[int], exclude: set[str], stamps: dict[int, float],
                        start: float) -> AsyncIterator[list[ChoiceDelta]]:
        """Re-submit every unfinished choice to another D and merge their streams."""
        pending = [c for c in req.choice_indices() if c not in finished]
        queue: asyncio.Queue = asyncio.Queue()
        ds = [w for w in self.registry.usable("decode") + self.registry.usable("both")
              if w.url not in exclude]
        if not ds:
            raise BackendError("the decode worker died and no other can continue the request")

        async def one(choice: int) -> None:
            toks = outputs.get(choice, [])
            d = self._pick(ds, [])
            rec = RequestRecord(f"{req.request_id}#fo{next(self._attempt)}",
                                req.prompt_token_ids, replace(req.params, n=1),
                                toks[:-1], choice, req.deadline, cache_salt=req.cache_salt)
            d.assign(rec.request_id, [], len(rec.prompt_token_ids))
            try:
                if not toks:  # the choice never produced a token: start it over
                    rec = replace(rec, output_token_ids=[])
                    async for rows in run_both(rec, d.link, self.request_timeout):
                        await queue.put(rows)
                else:
                    async for rows in run_resume(rec, d.link, toks[-1], self.request_timeout):
                        await queue.put(rows)
            except Exception as e:  # noqa: BLE001 - surfaced to the stream below
                await queue.put(e)
            finally:
                d.release(rec.request_id)
                await queue.put(None)

        metrics.FAILOVERS.inc(len(pending))
        logger.warning("D died mid-stream; re-submitting %d choice(s) of %s", len(pending),
                       req.request_id)
        tasks = [asyncio.get_running_loop().create_task(one(c)) for c in pending]
        live = len(tasks)
        try:
            while live:
                item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise BackendError(f"failover failed: {item}") from item
                else:
                    yield self._deliver(item, outputs, finished, stamps, start)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
