"""A discrete-event simulation of a pdserve cluster: what `pdserve plan` runs per layout and
request rate.

The parts, and where each comes from:
- **Engines**: one `StepEngine` per GPU (pdserve/plan/step_engine.py, the scheduler the fake
  engines of bench/fake_worker.py --step-model run in wall time), each step taking what the
  step model gives (pdserve/plan/step_model.py: fitted on measured GPU steps, mixed steps
  included). A P's first token ends its job; its KV then moves for the modelled transfer
  (prompt tokens x KV bytes per token / `transfer_gbps`) while P holds it; D decodes once
  its copy is in, one such transfer after the Join.
- **The proxy**: the real routing code (`ClusterBackend._route` over a real `Registry` and
  its `Worker`s: pick by score with power of two choices, `has_room`, the prompt-length rule,
  `--placement slo` with proxy/placement.py's estimates), fed by simulated links. The
  admission queue is first in line first, no overtaking (proxy/admission.py), and a request
  waiting past `max_queue_delay` fails (the real proxy's 429).
- **Load reports**: as the fakes send them: every frame a worker sends (a step's token rows,
  a P's first token, a finished transfer) carries its load (`engine_load`), and each link
  pings every `PING_INTERVAL_S`; the link's unacknowledged counts reset on each report (the
  fakes count nothing: bench/fake_worker.py).
- **Messages**: each proxy <-> worker message takes `hop_s`; the client sees a frame when the
  proxy does. A worker busy in a step takes what arrived in its next step; an idle one starts
  a step at once. `step_overhead_s` adds host time to every step, drawn per step from an
  exponential distribution of that mean (seeded: host noise is skewed, mostly small with a
  long tail; 0 for a fit of measured whole steps; the fakes' measured loop overhead when
  reproducing their runs).

Time is simulated: a run of minutes of traffic takes a second or so of CPU. What is not
modelled: preemption (the KV pool is reported, not enforced), prefix caching, failures, the
proxy's own CPU time, sampling and detokenization costs beyond the step model's.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from pdserve.bench_metrics import RequestResult
from pdserve.common.step_rates import StepRates
from pdserve.plan.step_engine import Job, StepEngine, StepPlan, engine_load
from pdserve.plan.step_model import StepModel
from pdserve.proxy.cluster_backend import ClusterBackend
from pdserve.proxy.placement import SLO
from pdserve.proxy.registry import Registry, Worker
from pdserve.proxy.workers import PING_INTERVAL_S

HOP_S = 0.0005  # one proxy <-> worker message on one host (ZMQ over loopback, both loops awake)
TRANSFER_GBPS = 20.0  # P -> D KV copy rate, GB/s: bench/fake_worker.py's default
MAX_QUEUE_DELAY_S = 20.0  # `pdserve serve --max-queue-delay`'s default


@dataclass(frozen=True)
class WorkerSpec:
    """One GPU's worker: its role and its engine's step budgets."""

    role: str  # "prefill", "decode" or "both"
    max_num_batched_tokens: int = 2048
    mixed_step_tokens: int | None = None  # a step that decodes takes at most this many
    max_num_seqs: int = 256


@dataclass(frozen=True)
class Layout:
    """A cluster: its workers and how the proxy places prompts."""

    name: str
    workers: tuple[WorkerSpec, ...]
    placement: str = "threshold"  # or "slo": proxy/placement.py's estimates per request
    slo: SLO = SLO(1.0, 0.025)  # the placement's bounds (placement "slo")
    min_pd_prompt_tokens: int = 16

    @property
    def gpus(self) -> int:
        return len(self.workers)


@dataclass(frozen=True)
class Request:
    """One request of a workload: when it comes (seconds from the start) and its lengths."""

    arrival: float
    prompt_tokens: int
    max_tokens: int


class _Record(SimpleNamespace):
    """What the proxy's routing and the step engine read of a request's wire record."""

    def choice_indices(self) -> list[int]:
        return [0]


@dataclass(eq=False)
class _Link:
    """A worker's data-path link as the proxy's routing sees it (proxy/workers.py WorkerLink:
    the latest load report and what was sent since)."""

    load: dict[str, Any] = field(default_factory=dict)
    routed: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    unacked_tokens: int = 0
    busy: bool = False
    alive: bool = True

    def in_flight(self) -> tuple[int, int]:
        return len(self.routed) + self.unacked, sum(self.routed.values()) + self.unacked_tokens

    def sent(self, rid: str, prompt_tokens: int) -> None:
        self.routed.pop(rid, None)
        self.unacked += 1
        self.unacked_tokens += prompt_tokens

    def report(self, load: dict[str, Any]) -> None:
        self.load = load
        self.unacked = self.unacked_tokens = 0  # a worker that does not count (the fakes)


class _Node:
    """One simulated GPU worker: its engine and its entry in the proxy's registry."""

    def __init__(self, name: str, spec: WorkerSpec, model: StepModel, transfer_s_per_token: float,
                 capacity: int):
        self.name, self.spec, self.capacity = name, spec, capacity
        self.engine = StepEngine(model, spec.role, spec.max_num_batched_tokens, spec.max_num_seqs,
                                 transfer_s_per_token, spec.mixed_step_tokens)
        self.rates = StepRates()
        self.step: StepPlan | None = None
        self.step_s = 0.0  # the running step's duration
        self.timer_at: float | None = None
        info: dict[str, Any] = {"limits": {"max_num_seqs": spec.max_num_seqs,
                                           "max_num_batched_tokens": spec.max_num_batched_tokens,
                                           "mixed_step_tokens": spec.mixed_step_tokens}}
        if spec.role != "prefill":
            info["kv_address"] = f"sim://{name}/kv"
        if spec.role == "both":
            info["acts_as_prefill"] = True
        self.link = _Link()
        self.worker = Worker(f"sim://{name}", spec.role, name, info, link=self.link,  # type: ignore[arg-type]
                             healthy=True, status="ok")

    def load(self) -> dict[str, Any]:
        return engine_load(self.engine, self.spec.role, self.capacity, self.rates)


class _Flight:
    """One request in the cluster: its result as the client measures it, and its route."""

    def __init__(self, index: int, req: Request):
        self.req = req
        self.rec = _Record(request_id=f"r{index}", prompt_token_ids=range(req.prompt_tokens),
                           output_token_ids=[], params=SimpleNamespace(max_tokens=req.max_tokens))
        self.result = RequestResult(index=index, start=req.arrival,
                                    num_input_tokens=req.prompt_tokens)
        self.route: tuple[str, _Node, _Node | None] | None = None
        self.tokens = 0


class Simulation:
    """One layout under one list of requests: `run()` returns each request's result (as
    `pdserve bench` records them: TTFT, chunk times, E2E) and the routes taken."""

    def __init__(self, layout: Layout, model: StepModel, *, transfer_gbps: float = TRANSFER_GBPS,
                 hop_s: float = HOP_S, time_scale: float = 1.0, seed: int = 0,
                 max_queue_delay: float = MAX_QUEUE_DELAY_S, kv_capacity_tokens: int = 0,
                 step_overhead_s: float = 0.0):
        self.layout, self.hop = layout, hop_s
        # host time each step takes beyond the model's (not scaled): 0 for an engine whose
        # fit measured whole steps; the fake engines' loop, measured, for bench/plan_check.py
        self.step_overhead = step_overhead_s
        self._noise = random.Random(seed + 1)
        model = model.scaled(time_scale) if time_scale != 1.0 else model
        per_token = (model.kv_bytes_per_token / (transfer_gbps * 1e9) * time_scale
                     if transfer_gbps > 0 else 0.0)
        capacity = kv_capacity_tokens or model.kv_capacity_tokens or 1 << 20
        self.nodes = [_Node(f"{s.role}-{i}", s, model, per_token, capacity)
                      for i, s in enumerate(layout.workers)]
        by_node = {n.worker.url: n for n in self.nodes}
        self._node_of: Callable[[Worker], _Node] = lambda w: by_node[w.url]
        self.registry = Registry({})
        self.registry.workers = [n.worker for n in self.nodes]
        self.registry.reference = {"block_size": 16}
        self.backend = ClusterBackend(self.registry, None, "plan",
                                      min_pd_prompt_tokens=layout.min_pd_prompt_tokens,
                                      placement=layout.placement, slo=layout.slo,
                                      max_queue_delay=max_queue_delay)
        self.backend._rng = random.Random(seed)
        self.backend.clock = lambda: self.now
        self.max_queue_delay = max_queue_delay
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._tie = itertools.count()
        self.queue: deque[_Flight] = deque()
        self.queued_tokens = 0
        self.flights: dict[str, _Flight] = {}
        self.open = 0  # requests arrived and not ended
        self.routes: dict[str, int] = {}
        self.now = 0.0

    # ---- the event loop ---------------------------------------------------------------

    def _at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t, next(self._tie), fn, args))

    def run(self, requests: Sequence[Request]) -> list[RequestResult]:
        flights = [_Flight(i, r) for i, r in enumerate(requests)]
        for f in flights:
            self.flights[f.rec.request_id] = f
            self._at(f.req.arrival, self._arrive, f)
        self.open = len(flights)
        for n in self.nodes:
            self._at(0.0, self._ping, n)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)
        return [f.result for f in flights]

    # ---- the proxy ------------------------------------------------------------------------

    def _arrive(self, f: _Flight) -> None:
        self.queued_tokens += f.req.prompt_tokens
        if not self.queue:  # nobody waits: routed at once, and sent at once
            self.backend._queued_tokens = self.queued_tokens
            route = self.backend._route(f.rec, set(), [])  # type: ignore[arg-type]
            if route is not None:
                self.queued_tokens -= f.req.prompt_tokens
                self._send(self._dispatch(f, route))
                return
        self.queue.append(f)
        self._admit()

    def _admit(self) -> None:
        """Route the requests waiting, first in line first, while workers have room. Each
        routed request's task sends its messages after the pass (proxy/admission.py wakes
        the waiters' futures): until then they count as routed, not sent, on their links
        (`has_room` lets a P take several prompts within one step's budget that way)."""
        routed: list[_Flight] = []
        while self.queue:
            f = self.queue[0]
            if self.now - f.req.arrival > self.max_queue_delay:  # the proxy's 429
                self.queue.popleft()
                self.queued_tokens -= f.req.prompt_tokens
                f.result.error = "overloaded: waited past --max-queue-delay"
                self._end(f)
                continue
            self.backend._queued_tokens = self.queued_tokens
            route = self.backend._route(f.rec, set(), [])  # type: ignore[arg-type]
            if route is None:
                break
            self.queue.popleft()
            self.queued_tokens -= f.req.prompt_tokens
            routed.append(self._dispatch(f, route))
        for f in routed:
            self._send(f)

    def _send(self, f: _Flight) -> None:
        assert f.route is not None
        for n in f.route[1:]:
            if n is not None:
                n.link.sent(f.rec.request_id, f.req.prompt_tokens)

    def _dispatch(self, f: _Flight, route: tuple[str, Worker, Worker | None]) -> _Flight:
        kind, a, b = route
        self.routes[kind] = self.routes.get(kind, 0) + 1
        na = self._node_of(a)
        nb = self._node_of(b) if b is not None else None
        f.route = (kind, na, nb)
        rec, rid, n = f.rec, f.rec.request_id, f.req.prompt_tokens
        t = self.now + self.hop
        if kind == "pd":
            assert nb is not None
            self._at(t, self._deliver, nb, lambda e: e.reserved.__setitem__(rid, (f, rec)))
            self._at(t, self._deliver, na, lambda e: e.add(self._job(f, 1, n, kv="sim", p=True)))
        elif kind == "p_only":
            self._at(t, self._deliver, na, lambda e: e.add(self._job(f, 1, n, kv=None, p=True)))
        else:  # "both" / "skip_p": the worker computes the whole request
            self._at(t, self._deliver, na,
                     lambda e: e.add(self._job(f, max(1, f.req.max_tokens), n)))
        return f

    @staticmethod
    def _job(f: _Flight, left: int, prefill: int, **kw: Any) -> Job:
        return Job(f, f.rec, {0: left}, prefill, itertools.repeat(0), **kw)

    def _from_worker(self, node: _Node, load: dict[str, Any],
                     out: list[tuple[Job, list[Any]]]) -> None:
        """A worker's frames reach the proxy: its load report, then the rows (a P's first
        token: the Join goes to D; a last token: the request ends)."""
        node.link.report(load)
        for job, rows in out:
            f: _Flight = job.identity
            if self.flights.get(f.rec.request_id) is not f or f.result.ok:
                continue
            f.result.chunk_times.append(self.now - f.req.arrival)
            f.tokens += 1
            if any(r.finish_reason is not None for r in rows):
                f.result.ok = True
                route = f.route
                if job.p and route is not None and route[2] is not None:
                    # it ended at its first token on P: D never decodes it (run_pd's Abort)
                    rid = f.rec.request_id
                    self._at(self.now + self.hop, self._deliver, route[2],
                             lambda e, rid=rid: e.abort(rid))
                self._end(f)
            elif job.p:  # P's first token: D decodes the rest once the KV is in
                route = f.route
                assert route is not None and route[2] is not None
                self._at(self.now + self.hop, self._deliver, route[2],
                         lambda e, f=f: self._join(e, f))
        self._admit()

    def _end(self, f: _Flight) -> None:
        f.result.end = self.now - f.req.arrival
        f.result.num_output_tokens = f.tokens
        if f.route is not None:
            kind, a, b = f.route
            for n in (a, b):
                if n is not None:
                    n.worker.release(f.rec.request_id)
        del self.flights[f.rec.request_id]
        self.open -= 1

    def _ping(self, node: _Node) -> None:
        """A link's ping: the worker answers at once (also mid-step) with its load."""
        if not self.open:
            return
        self._at(self.now + self.hop, lambda: self._at(self.now + self.hop, self._from_worker,
                                                       node, node.load(), []))
        self._at(self.now + PING_INTERVAL_S, self._ping, node)

    # ---- the workers ----------------------------------------------------------------------

    def _join(self, e: StepEngine, f: _Flight) -> None:
        rid = f.rec.request_id
        if e.reserved.pop(rid, None) is None:
            return
        left = f.req.max_tokens - 1
        if left > 0:
            job = self._job(f, left, 0)
            job.kv_len = f.req.prompt_tokens
            e.arrive(job, self.now)

    def _deliver(self, node: _Node, apply: Callable[[StepEngine], None]) -> None:
        apply(node.engine)
        self._kick(node)

    def _kick(self, node: _Node) -> None:
        """The worker's loop turn: transfers that ended are reported, then an idle engine
        starts its next step."""
        e = node.engine
        ended = e.due(self.now)
        if ended:
            self._at(self.now + self.hop, self._from_worker, node, node.load(), [])
        if node.step is None and (plan := e.schedule()) is not None:
            node.step = plan
            node.step_s = plan.seconds + (self._noise.expovariate(1 / self.step_overhead)
                                          if self.step_overhead > 0 else 0.0)
            self._at(self.now + node.step_s, self._step_end, node)
        nxt = e.next_due()
        if nxt is not None and (node.timer_at is None or nxt < node.timer_at):
            node.timer_at = nxt
            self._at(nxt, self._timer, node)

    def _timer(self, node: _Node) -> None:
        if node.timer_at is not None and node.timer_at <= self.now:
            node.timer_at = None
        self._kick(node)

    def _step_end(self, node: _Node) -> None:
        plan, node.step = node.step, None
        assert plan is not None
        out = node.engine.complete(plan, self.now)
        node.rates.observe(plan.prefill_tokens, plan.num_seqs, node.step_s,
                           decodes=len(plan.decodes))
        if out:
            self._at(self.now + self.hop, self._from_worker, node, node.load(), out)
        self._kick(node)
