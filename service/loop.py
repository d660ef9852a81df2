"""What every worker process (P, D, both) shares: the step loop over one engine, the
data-path socket, the load report, the compatibility record and the ORCA header.

Threads: the main thread runs the step loop (`WorkerLoop.run`), which owns the engine and
the data-path ROUTER socket and never blocks on I/O while there is work; uvicorn serves
/health, /load, /info and /metrics from a second thread (`ops_http.py`), reading a snapshot
the loop publishes after every iteration. kv_transfer endpoints run their own I/O thread.

Wake-ups: with nothing to run, the loop sleeps in one poll on the data-path socket, its own
Waker (stop, GPU completions) and each transfer endpoint's event pipe (`wake_fds`), until
the nearest deadline its role keeps (`next_deadline`), or forever: an idle worker uses no
CPU, and a message, a transfer's end or a completed copy is handled the moment it comes.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import replace
from typing import Any

import torch
import zmq

from pdserve.common.compat import CompatRecord
from pdserve.common.logs import Throttled
from pdserve.common.params import SamplingParams
from pdserve.common.stats_line import StatsLine, Totals
from pdserve.common.wakeup import Waker
from pdserve.common.wire import (
    DATA_PATH,
    Abort,
    DataMessage,
    Error,
    Generate,
    Ping,
    Pong,
    Prefill,
    RequestRecord,
    Reserve,
    Step,
    WireError,
)
from pdserve.engine.kv_pool import POOL_LAYOUT, dtype_name
from pdserve.engine.llm_engine import LLMEngine, Role
from pdserve.engine.sampler import SampleRow
from pdserve.engine.setup import EngineParts
from pdserve.service import metrics
from pdserve.service.config import WorkerConfig
from pdserve.service.gpu_turns import TurnAnnouncer, TurnListener

logger = logging.getLogger(__name__)
flood = Throttled(logger)  # what a peer can repeat at will is logged at most every 10 s


def _counted(counter: Any) -> float:
    """The sum of a labelled Prometheus counter's totals (every label set)."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def compat_record(parts: EngineParts) -> CompatRecord:
    """The record both ends of a transfer (and the proxy) compare at handshake."""
    spec = parts.pool.spec
    return CompatRecord.build(
        parts.model_path, parts.config.tokenizer, dtype=dtype_name(spec.dtype),
        block_size=spec.block_size, pool_layout=POOL_LAYOUT, num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_model_len=parts.max_model_len)


def _gist(load: dict[str, Any]) -> tuple:
    """What of a load report decides a proxy's admission (proxy/registry.py has_room)."""
    return (load.get("num_requests_running"), load.get("num_requests_waiting"),
            load.get("pending_prefill_tokens"))


def orca_header(fmt: str | None, load: dict[str, Any]) -> str | None:
    """`endpoint-load-metrics` value as vLLM writes it (Envoy parses both forms)."""
    metrics = {"kv_cache_usage_perc": float(load.get("kv_cache_usage_perc", 0.0)),
               "num_requests_waiting": float(load.get("num_requests_waiting", 0))}
    fmt = (fmt or "").strip().lower()
    if fmt == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in metrics.items())
    if fmt == "json":
        return "JSON " + json.dumps({"named_metrics": metrics})
    return None


WARMUP_OUTPUT_TOKENS = 3  # per warm-up request: a few decode steps (D, both)
STALLED_WAIT_MS = 100  # a stalled engine's longest sleep: a safety net, events wake it first
DRAIN_LINGER_S = 1.0  # a drained worker's last answers (see WorkerLoop._linger_end)


class _StopEvent(threading.Event):
    """`set()` also wakes the step loop's poll (from any thread or a signal handler)."""

    def __init__(self, waker: Waker):
        super().__init__()
        self.waker = waker

    def set(self) -> None:
        super().set()
        self.waker.wake()


class WorkerLoop:
    """The step loop of one worker: data-path socket in, engine steps, replies out.

    Subclasses implement `on_message(identity, msg)` (one decoded message; raise WireError
    to refuse it), `tick()` (events, deadlines; every iteration), `step()` (one engine step
    and its replies), `load()` and `info()`. Replies go through `send(identity, msg)`.
    """

    role = Role.BOTH

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        self.cfg = cfg
        self.parts = parts
        self.engine = LLMEngine(parts, self.role)
        self.compat = compat_record(parts)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 32 << 20)
        self.sock.bind(f"tcp://{cfg.host}:{cfg.data_address_port}")
        self.data_address = f"tcp://{cfg.public_host}:{cfg.data_address_port}"
        self._token = (cfg.internal_token or "").encode()
        self.waker = Waker()  # wakes the step loop's poll: stop, GPU completions
        self.stop_event = _StopEvent(self.waker)
        self.snapshot: dict[str, Any] = {"load": {}, "health": {
            "status": "starting", "reason": "loading the model", "role": self.role.value,
            "name": cfg.worker_name}}
        self.warmup_s: float | None = None  # how long `warm_up` took
        self._seq = 0
        self._counted = (0, 0, 0)  # preemptions, prefix queries, prefix hits already exported
        self.dead_reason: str | None = None
        self.draining_since: float | None = None  # SIGTERM: finish what runs, take nothing new
        self._drain_logged = False
        self._drain_in_flight = 0  # requests in flight when SIGTERM came
        self._last_refusal = 0.0  # when draining refused a request last
        self.reqs: dict[str, Any] = {}  # request id -> the role's state of it
        # Each proxy learns from our load reports how many of its requests we have taken in
        # ("acked"): what it sent beyond that is still on the way, and it counts it on top of
        # the report when it decides whether we have room (proxy/registry.py has_room).
        self._acks: dict[bytes, list[int]] = {}  # identity -> [requests, their prompt tokens]
        self._told: dict[bytes, tuple] = {}  # identity -> (`_gist`, acks) its last report had
        self._gone: set[bytes] = set()  # identities we could not reach
        self._epoch = int.from_bytes(os.urandom(4), "little")  # a restart resets the counts
        # prefill first on a shared GPU (service/gpu_turns.py): P announces, D holds
        self.turns_out = TurnAnnouncer(cfg.gpu_turns_notify, cfg.worker_name) \
            if cfg.gpu_turns_notify and self.role is Role.PREFILL else None
        self.turns_in = TurnListener(cfg.gpu_turns_socket, cfg.gpu_turns_max_hold_ms / 1000) \
            if cfg.gpu_turns_socket and self.role is Role.DECODE else None
        self.stats = StatsLine(lambda line: logger.info("%s", line), cfg.stats_interval,
                               self._totals)

    # ---- to implement --------------------------------------------------------------------

    def on_message(self, identity: bytes, msg: DataMessage) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Drain transfer events, admit queued work, enforce deadlines. Called every loop."""

    def step(self) -> None:
        raise NotImplementedError

    def load(self) -> dict[str, Any]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def wake_fds(self) -> list[int]:
        """File descriptors whose readability means `tick()` has something to do (transfer
        endpoints' event pipes); the idle loop's poll watches them."""
        return []

    def next_deadline(self) -> float | None:
        """The nearest `time.monotonic()` at which `tick()` must run though nothing came
        (a reservation's timeout); None: none."""
        return None

    def close(self) -> None:
        """Release endpoints and the pool (the loop has ended); stop the other
        tensor-parallel ranks."""
        self.parts.pool.close()
        self.parts.close()

    # ---- shared --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def check_new(self, rec: RequestRecord) -> None:
        """Refuse a record this worker cannot start: a request id already in flight here, or
        no seed (the proxy draws one, so retries and failover repeat the same draws)."""
        if rec.request_id in self.reqs:
            raise WireError(f"request id {rec.request_id} is already in flight", rec.request_id)
        if rec.params.seed is None:
            raise WireError("rec.params.seed must be set (the proxy draws one)", rec.request_id)

    def send(self, identity: bytes, msg: DataMessage) -> None:
        try:
            self.sock.send_multipart([identity, DATA_PATH.encode(msg)], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as e:  # proxy gone or full: it will time out
            if not isinstance(e, zmq.Again):  # gone: no unasked reports until it sends again
                self._gone.add(identity)
            flood.warning("unreachable", "cannot reach %r (%s); dropped %s", identity, e,
                          type(msg).__name__)

    def load_for(self, identity: bytes, load: dict[str, Any]) -> dict[str, Any]:
        """`load` as one proxy gets it: with how many of its requests we have taken in."""
        acks = self._acks.get(identity, (0, 0))
        if identity in self._acks:
            self._told[identity] = (_gist(load), tuple(acks))
        return {**load, "acked": acks[0], "acked_tokens": acks[1], "epoch": self._epoch}

    def settle(self) -> None:
        """A load report to each proxy that sent us requests and whose view of our room is
        stale: requests of its that no report acknowledged (one refused, or not in a step
        yet), or a load changed since its last report without a step that told it (a
        reservation freed by a transfer event, an abort on an idle worker). Its admission
        must never wait for a step that may not come."""
        if not self._acks:
            return
        load = self.load()
        gist = _gist(load)
        for identity in list(self._acks):
            if identity in self._gone:
                continue
            if self._told.get(identity) != (gist, tuple(self._acks[identity])):
                self.send(identity, Step(seq=0, out=[], load=self.load_for(identity, load)))

    def _receive(self) -> None:
        while True:
            try:
                identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue  # a frame without a body: nothing to answer
            msg = None
            try:
                msg = DATA_PATH.decode(frame)
                if self._token and not hmac.compare_digest(msg.t.encode(), self._token):
                    raise WireError("wrong internal token", getattr(msg, "rid", None))
                if isinstance(msg, Ping):  # the proxy's liveness probe of this loop
                    self._gone.discard(identity)
                    self.send(identity, Pong(n=msg.n, load=self.load_for(identity, self.load())))
                    continue
                if isinstance(msg, Abort) and self.draining_since is not None and \
                        msg.rid not in self.reqs:
                    continue  # the proxy's abort of a request the drain refused
                if isinstance(msg, Reserve | Prefill | Generate) and \
                        self.draining_since is not None:
                    self._last_refusal = time.monotonic()
                    self.send(identity, Error(
                        reason="the worker is draining (stopping): it takes no new request",
                        rid=msg.rec.request_id, retryable=True, code="draining"))
                    continue
                if isinstance(msg, Reserve | Prefill | Generate):  # taken in, whatever comes
                    self._gone.discard(identity)
                    acks = self._acks.setdefault(identity, [0, 0])
                    acks[0] += 1
                    acks[1] += len(msg.rec.prompt_token_ids)
                self.on_message(identity, msg)
            except WireError as e:
                flood.warning("refused", "refused a data-path message: %s", e)
                self.send(identity, Error(reason=str(e), rid=e.rid))
            except Exception as e:  # a bug handling one message must not end the worker
                rid = getattr(msg, "rid", None) or getattr(getattr(msg, "rec", None),
                                                           "request_id", None)
                logger.exception("failed handling a %s message", type(msg).__name__)
                self.send(identity, Error(reason=f"the worker failed handling it: {e!r}",
                                          rid=rid))

    def full(self, identity: bytes, rid: str, queued: int) -> bool:
        """True (and a busy answer sent) when `queued` requests already wait here."""
        if queued < self.cfg.max_queued_requests:
            return False
        metrics.REJECTED.labels(self.role.value).inc()
        self.send(identity, Error(reason=f"busy: {queued} requests are queued on this worker",
                                  rid=rid, retryable=True, code="busy"))
        return True

    def fail_request(self, rid: str, why: str) -> None:
        """The engine aborted `rid` (it failed the step by itself): tell its proxy, forget it.
        Another worker may try once (`code="engine"`)."""
        r = self.reqs.pop(rid, None)
        if r is not None:
            self.send(r.identity, Error(reason=f"the engine failed on this request: {why}",
                                        rid=rid, retryable=True, code="engine"))
            metrics.REQUESTS.labels(self.role.value, "error").inc()

    def publish(self) -> None:
        """Refresh what the HTTP thread serves (a new dict each time: no locking needed)."""
        self._seq += 1
        load = {**self.load(), "seq": self._seq, "time": time.time()}
        metrics.RUNNING.set(load.get("num_requests_running", 0))
        metrics.WAITING.set(load.get("num_requests_waiting", 0))
        metrics.KV_USAGE.set(load.get("kv_cache_usage_perc", 0.0))
        bm = self.engine.bm
        counts = (self.engine.scheduler.num_preemptions, bm.num_prefix_queries, bm.num_prefix_hits)
        for counter, now, before in zip((metrics.PREEMPTIONS, metrics.PREFIX_QUERIES,
                                         metrics.PREFIX_HITS), counts, self._counted):
            if now > before:
                counter.inc(now - before)
        self._counted = counts
        status = "ok" if self.dead_reason is None else "dead"
        if status == "ok" and self.draining_since is not None:
            status = "draining"
        self.snapshot = {"load": load, "health": {"status": status, "role": self.role.value,
                                                  "name": self.cfg.worker_name,
                                                  "reason": self.dead_reason or (
                                                      f"draining: {len(self.reqs)} request(s)"
                                                      " to finish, no new ones"
                                                      if status == "draining" else None),
                                                  "warmup_s": self.warmup_s, **self.info()}}

    def warmup_prompts(self) -> list[list[int]]:
        """Prompt lengths of the warm-up's rounds (each round's prompts run together).
        Compiled kernels (Triton) specialize on integer arguments (== 1, multiples of 16)
        and pick tiles by size, so the rounds give each integer a kernel sees (tokens in a
        step, block-table width, query tiles) each class and the pairs live prompts make:
        prompts longer than a step's token budget (a full chunk, then a short or a long one
        over prior context), one just under the budget, one token alone, 17 + 32 tokens
        together, 300 and 256 tokens. The torch ops compile nothing: one
        short round proves the path."""
        cap = self.engine.max_model_len - 1 - WARMUP_OUTPUT_TOKENS
        if cap < 1:
            return []
        if self.parts.runner.ops.name == "torch":
            return [[min(n, cap) for n in (1, 17, 32)]]
        budget = self.parts.config.max_num_batched_tokens
        # the long ones: a full chunk then a short one over context; a chunk just under the
        # budget alone and over a full chunk of context (query tiles a multiple of 16,
        # block-table widths not)
        return [[min(n, cap) for n in r]
                for r in ([budget + 37], [max(1, budget - 96)], [2 * budget - 96], [1],
                          [17, 32], [300], [256])]

    def warm_sampler(self) -> list[int]:
        """Draw from random logits at each row count whose kernel launch differs (the
        exponential race splits the vocabulary over fewer programs as rows grow, which
        changes the reduce kernel's tile: 1, 3, 9, 17, ... rows up to max_num_seqs).
        Returns the row counts drawn."""
        top = self.parts.config.max_num_seqs
        counts = sorted({min(n, top) for n in (1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513)})
        vocab = self.parts.model_config.vocab_size
        gen = torch.Generator(device="cpu").manual_seed(0)
        for n in counts:
            logits = torch.randn(n, vocab, generator=gen).to(self.parts.device)
            rows = [SampleRow(SamplingParams(temperature=1.0, seed=i), i, 0, (1, 2), 1)
                    for i in range(n)]
            self.parts.sampler(logits, rows)
        return counts

    def warm_up(self) -> float:
        """Before serving: run every kernel shape class this role uses (prefill chunks short
        and long, decode (D, both), sampling greedy and random with top-k/top-p, logprobs,
        n = 2 forks) through the engine, so no live request pays for compiling them.
        /health answers 503 "warming" meanwhile. Returns the seconds it took. Raises if
        the engine cannot run (the worker then exits with the error)."""
        t0 = time.monotonic()
        rounds = self.warmup_prompts()
        sizes = " then ".join("/".join(map(str, r)) for r in rounds)
        self.snapshot = {**self.snapshot, "health": {
            **self.snapshot["health"], "status": "warming",
            "reason": f"warming up: compiling and running each kernel shape before serving "
                      f"(prompts of {sizes} tokens, decode, sampling)"}}
        eng, rng = self.engine, random.Random(0)
        vocab = self.parts.model_config.vocab_size
        kinds = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
                 SamplingParams(temperature=0.8, top_p=0.9, top_k=20, logprobs=2),
                 SamplingParams(temperature=1.0, n=2)]
        n = 0
        for lengths in rounds:
            for length in lengths:
                p = kinds[n % len(kinds)]
                params = replace(p, max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True, seed=n)
                eng.add_request([rng.randrange(vocab) for _ in range(length)], params,
                                f"warmup-{n}")
                n += 1
            while eng.has_unfinished():
                eng.step()
                if eng.failed:
                    raise RuntimeError(f"warm-up request failed: {eng.failed[0][1]}")
            for rid in list(eng.scheduler.held):  # P keeps prefilled blocks for a transfer
                eng.scheduler.release(rid)
        if self.parts.runner.ops.name != "torch":
            self.warm_sampler()
        bm = self.engine.bm  # its prefix lookups are not traffic
        self.engine.rates.reset()  # nor its step times (compiles among them)
        self._counted = (self.engine.scheduler.num_preemptions, bm.num_prefix_queries,
                         bm.num_prefix_hits)
        self.warmup_s = time.monotonic() - t0
        logger.info("warm-up done in %.2f s (prompts of %s tokens)", self.warmup_s, sizes)
        return self.warmup_s

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests (retryable: the proxy tries another worker), finish
        those in flight, then stop (`run` returns), within --drain-timeout; a second SIGTERM
        stops at once. (Signal handler: it only sets state and wakes the loop.)"""
        if self.draining_since is not None or self.cfg.drain_timeout <= 0:
            self.stop_event.set()
            return
        self.draining_since = time.monotonic()
        self._drain_in_flight = len(self.reqs)  # logged by the loop (`_drained`)
        self.waker.wake()

    def _linger_end(self) -> float:
        """A drained worker still answers for DRAIN_LINGER_S after the drain began and after
        each request it refused: a request a proxy sent before it learnt of the drain gets
        its "draining" answer (and goes elsewhere at once) instead of silence."""
        return max(self.draining_since, self._last_refusal) + DRAIN_LINGER_S

    def _drained(self) -> bool:
        """Draining and nothing left in flight here (or the drain's time ran out)."""
        now = time.monotonic()
        if not self._drain_logged:  # the first turn of the loop since SIGTERM
            self._drain_logged = True
            logger.info("draining (SIGTERM): %d request(s) in flight to finish, new ones "
                        "refused; stopping once done (--drain-timeout %.0f s)",
                        self._drain_in_flight, self.cfg.drain_timeout)
        if now >= self.draining_since + self.cfg.drain_timeout:
            if self.reqs or self.has_work():
                logger.warning("drain timeout (%.0f s): stopping with %d request(s) in "
                               "flight", self.cfg.drain_timeout, len(self.reqs))
            return True
        if self.reqs or self.has_work() or now < self._linger_end():
            return False
        logger.info("drained: nothing in flight; stopping")
        return True

    def _wait_ms(self) -> int | None:
        """How long the poll may sleep: 0 while the engine can run; else until the role's
        nearest deadline (a stalled engine, waiting for blocks a transfer holds, at most
        STALLED_WAIT_MS); None (until woken) when idle."""
        if self.has_work() and not self.engine.scheduler.stalled:
            hold = self._hold_until(time.monotonic())
            if hold is None:
                return 0
            # a P on this GPU prefills: wait for its idle datagram, or the hold's end
            deadline = min(filter(None, (self.next_deadline(), hold)))
            return max(0, int((deadline - time.monotonic()) * 1000) + 1)
        deadline = self.next_deadline()
        if self.draining_since is not None:  # the drain's end, or its linger's
            end = min(self.draining_since + self.cfg.drain_timeout, self._linger_end())
            deadline = end if deadline is None else min(deadline, end)
        wait = None if deadline is None else \
            max(0, int((deadline - time.monotonic()) * 1000) + 1)
        if self.has_work():  # stalled
            wait = STALLED_WAIT_MS if wait is None else min(wait, STALLED_WAIT_MS)
        return wait

    def run(self) -> None:
        """Until SIGTERM/SIGINT or `stop_event`: receive, tick, step, publish."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.waker.fd, zmq.POLLIN)
        for fd in self.wake_fds():
            poller.register(fd, zmq.POLLIN)
        rank_fds = self.parts.tp.exit_fds() if self.parts.tp is not None else []
        for fd in rank_fds:  # a tensor-parallel rank exits: this worker is done
            poller.register(fd, zmq.POLLIN)
        if self.turns_in is not None:
            poller.register(self.turns_in.fd, zmq.POLLIN)
        previous_fd = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGTERM, lambda *_: self.begin_drain())
            # a process-directed signal may be delivered to any thread (the KV I/O thread,
            # the HTTP thread): the main thread, asleep in the poll, would never run the
            # handler. CPython writes each signal to this fd, whatever thread took it.
            previous_fd = signal.set_wakeup_fd(self.waker.write_fd, warn_on_full_buffer=False)
        self.publish()
        try:
            while not self.stop_event.is_set():
                ready = dict(poller.poll(self._wait_ms()))
                if self.waker.fd in ready:
                    self.waker.drain()
                if any(fd in ready for fd in rank_fds):
                    self._rank_died()
                    break
                if self.sock in ready:
                    self._receive()
                if self.turns_in is not None and self.turns_in.fd in ready:
                    self.turns_in.drain()  # also when idle: an unread datagram would spin the poll
                self.tick()  # drains the transfer events (their pipes with them)
                if self.turns_out is not None:
                    self.turns_out.set(self.turn_busy(time.monotonic()))  # before the kernels
                if self.has_work() and not self._holding():
                    try:
                        self.step()
                    except Exception as e:  # an engine fault: report dead, keep answering
                        logger.exception("engine step failed")
                        self.dead_reason = f"engine step failed: {e}"
                        self.stop_event.set()
                    for rid, why in self.engine.failed:
                        self.fail_request(rid, why)
                    self.engine.failed.clear()
                self.settle()
                if self.turns_out is not None:
                    self.turns_out.set(self.turn_busy(time.monotonic()))
                self.publish()
                self.stats.tick()
                if self.draining_since is not None and self._drained():
                    break
        finally:
            if previous_fd is not None:
                signal.set_wakeup_fd(previous_fd)
            self.shutdown()

    def _rank_died(self) -> None:
        """A tensor-parallel follower exited (its pidfd is readable): report dead and stop;
        the worker exits non-zero and the proxy ejects it (`engine/parallel.py`)."""
        try:
            self.parts.tp.check()  # type: ignore[union-attr]
            why = "a tensor-parallel rank exited"
            logger.error("%s", why)
        except Exception as e:  # noqa: BLE001 - TensorParallelError (logged), naming the rank
            why = str(e)
        self.dead_reason = f"engine step failed: {why}"
        self.stop_event.set()

    def _totals(self) -> Totals:
        """This worker's token totals and queues, for its stats line."""
        load = self.load()
        return Totals(_counted(metrics.PROMPT_TOKENS), _counted(metrics.GENERATION_TOKENS),
                      int(load.get("num_requests_running", 0)),
                      int(load.get("num_requests_waiting", 0)),
                      f", KV cache usage: {100 * float(load.get('kv_cache_usage_perc', 0)):.1f}%")

    def turn_busy(self, now: float) -> bool:
        """P on a shared GPU (--prefill-first): whether its turn goes on."""
        return self.has_work()

    def urgent_step(self) -> bool:
        """Whether the next step carries a token no turn-taking hold may delay (D: a joined
        request's first D token)."""
        return False

    def _hold_until(self, now: float) -> float | None:
        """D on a shared GPU while a P there prefills (gpu_turns): when the hold ends; None:
        step now (no P busy, the hold ran out, or the step is urgent)."""
        if self.turns_in is None or self.urgent_step():
            return None
        return self.turns_in.hold_until(now)

    def _holding(self) -> bool:
        """D on a shared GPU while a P there prefills (gpu_turns): skip this step."""
        if self.turns_in is None:
            return False
        now = time.monotonic()
        if self.urgent_step():
            self.turns_in.drain()
            if self.turns_in.busy:
                metrics.GPU_TURN_URGENT_STEPS.inc()
        elif self.turns_in.hold_until(now) is not None:
            return True
        self.turns_in.stepped(now)
        return False

    def shutdown(self) -> None:
        """Release everything the loop holds (after `run`, or when it never ran)."""
        for t in (self.turns_out, self.turns_in):
            if t is not None:
                t.close()
        self.close()
        self.sock.close(0)
        self.ctx.term()
        self.waker.close()
