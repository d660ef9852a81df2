"""The proxy's side of the data path: one DEALER link per worker, and the P/D request flow.

`WorkerLink` owns one socket and a reader task that routes each reply to the queue of its
request id (a Step frame's rows fan out to many requests) and keeps the worker's latest load
report. `run_pd` drives one request through a decode-first reservation:
Prefill on P (with D's KV address as D reported it; without one P waits for D's Reserved,
which names it) and at once Reserve on D -> Reserved -> First (yielded at once) -> Join on
D with the still-running choices (sent when the request's task next yields the loop: after
the first token went to the client) -> Step rows until every choice finished.
`run_both` sends Generate to a both-role worker; `run_prefill_only` sends a request that ends
at its first token to P alone. Leaving either generator early (client
gone, error) sends Abort to every worker involved. Messages are `common/wire.py`'s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from pdserve.common import wire
from pdserve.common.logs import Throttled
from pdserve.common.wire import DATA_PATH, RequestRecord, TokenRow, WireError

logger = logging.getLogger(__name__)
flood = Throttled(logger)
# plain ints: pyzmq's constants are IntFlag members, and `int & IntFlag` runs enum's Python
# code (a few percent of the proxy's CPU per frame in a profile)
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class Inbox:
    """One request's messages from one worker: asyncio.Queue's calls that the data path
    uses, without its bookkeeping (a deque and at most one waiting reader: the request's
    own task). A `get` that is cancelled leaves nothing behind."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> Any:
        return self._items.popleft()  # IndexError when empty, as the caller checked

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()
_link_ids = itertools.count()
PING_INTERVAL_S = 0.5  # how often each link pings its worker's step loop


class WorkerError(RuntimeError):
    """A worker refused or failed a request; `retryable` when another worker may succeed;
    `code` as the worker's Error says ("engine": its engine failed on the request)."""

    def __init__(self, message: str, retryable: bool = False, code: str = "",
                 link: WorkerLink | None = None):
        super().__init__(message)
        self.retryable, self.code, self.link = retryable, code, link


@dataclass(eq=False)
class WorkerLink:
    """DEALER socket to one worker's data path. Create in a running event loop."""

    address: str
    token: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    # What the worker does not know yet, on top of its latest report: requests routed here
    # whose first message is not sent (rid -> prompt tokens), and those sent that no report
    # has acknowledged yet (the worker counts what it took in from us: "acked").
    routed: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    unacked_tokens: int = 0
    busy: bool = False  # it answered busy; no room until its next report
    last_heard: float = 0.0  # time.monotonic() of the last frame from the worker
    silence_limit: float = 2.0  # seconds without a frame (pings every PING_INTERVAL_S): dead
    alive: bool = True  # its data path answers (False: silent past `silence_limit`)
    on_transfer: Any = None  # callback(rid, ok, reason) for P's Transfer reports
    on_report: Any = None  # callback() after each load report (room may have opened)
    on_dead: Any = None  # callback() when the data path goes silent past `silence_limit`

    def __post_init__(self) -> None:
        # a plain socket driven by the event loop's reader on its FD: zmq.asyncio's futures
        # cost more per message than everything else the proxy does with a frame
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block a send: queue it
        self.sock.setsockopt(zmq.IDENTITY, f"proxy-{id(self):x}-{next(_link_ids)}".encode())
        self.sock.connect(self.address)
        self.queues: dict[str, Inbox] = {}
        self._epoch: int | None = None  # of the worker's counts (`_acknowledge`)
        self._acked = (0, 0)
        self.last_heard = time.monotonic()
        self._answered = 0  # the latest Ping answered
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.getsockopt(zmq.FD)
        self._drain_soon = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self._watcher = self._loop.create_task(self._watch())

    def send(self, msg: wire.DataMessage) -> None:
        msg.t = self.token
        self.sock.send(DATA_PATH.encode(msg), _NOBLOCK)
        if not self._drain_soon:  # a send can consume the FD's edge: look for replies
            self._drain_soon = True
            self._loop.call_soon(self._drain)
        if isinstance(msg, wire.Reserve | wire.Prefill | wire.Generate):
            self.routed.pop(msg.rec.request_id, None)
            self.unacked += 1
            self.unacked_tokens += len(msg.rec.prompt_token_ids)

    def in_flight(self) -> tuple[int, int]:
        """Requests and prompt tokens on their way here that the latest report does not
        count (routed, or sent and not acknowledged)."""
        return len(self.routed) + self.unacked, sum(self.routed.values()) + self.unacked_tokens

    def _acknowledge(self, load: dict[str, Any]) -> None:
        acked, tokens, epoch = load.get("acked"), load.get("acked_tokens", 0), load.get("epoch")
        if acked is None:  # a worker that does not count (bench/fake_worker.py): reset
            self.unacked = self.unacked_tokens = 0
            return
        if self._epoch is None:  # the first report: counts from zero, like ours
            self._epoch = epoch
        if epoch != self._epoch:  # a restarted worker: what the old one was sent is lost
            self._epoch, self._acked = epoch, (acked, tokens)
            self.unacked = self.unacked_tokens = 0
            return
        self.unacked = max(0, self.unacked - (acked - self._acked[0]))
        self.unacked_tokens = max(0, self.unacked_tokens - (tokens - self._acked[1]))
        self._acked = (acked, tokens)

    def subscribe(self, rid: str) -> Inbox:
        q = Inbox()
        self.queues[rid] = q
        return q

    def unsubscribe(self, rid: str) -> None:
        self.queues.pop(rid, None)

    def fail_all(self, reason: str) -> None:
        """The worker is gone: every request waiting on it fails over (retryable)."""
        self.unacked = self.unacked_tokens = 0
        for q in self.queues.values():
            q.put_nowait(wire.Error(reason=reason, retryable=True))

    def silence(self) -> float:
        """Seconds since the worker's last frame."""
        return time.monotonic() - self.last_heard

    async def _watch(self) -> None:
        """Ping the worker's step loop every PING_INTERVAL_S (while unanswered, once per
        `silence_limit`: pings do not pile up for a dead worker); past `silence_limit`
        without a frame it is dead: its requests fail over at once and it gets none until it
        answers again (a frozen or wedged worker, whose HTTP thread may still look fine)."""
        n, sent_at = 0, 0.0
        while True:
            now = time.monotonic()
            gap = PING_INTERVAL_S if self._answered >= n else self.silence_limit
            if now - sent_at >= gap:
                n, sent_at = n + 1, now
                try:
                    self.send(wire.Ping(n=n))
                except zmq.ZMQError:
                    return
            if self.alive and self.silence() > self.silence_limit:
                self.alive = False
                logger.warning("worker %s: no answer on the data path for %.1f s: ejected, its "
                               "requests fail over", self.address, self.silence())
                self.fail_all(f"the worker's data path stopped answering ({self.address})")
                if self.on_dead is not None:
                    self.on_dead()
            try:
                await asyncio.sleep(PING_INTERVAL_S / 4)
            except asyncio.CancelledError:
                return

    def _drain(self) -> None:
        """Every frame waiting on the socket (the FD is edge-triggered: read while EVENTS says
        POLLIN; asking EVENTS, not recv's EAGAIN, ends the loop: pyzmq raises EAGAIN as an
        exception, ~4% of a py-spy profile's samples of the proxy at sequential requests)."""
        self._drain_soon = False
        sock = self.sock
        while not self._closed:
            try:
                if not sock.getsockopt(_EVENTS) & _POLLIN:
                    return
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            try:
                msg = DATA_PATH.decode(frame)
            except WireError as e:
                flood.warning("bad frame", "bad frame from worker %s: %s", self.address, e)
                continue
            self._handle(msg)

    def _handle(self, msg: wire.DataMessage) -> None:
        self.last_heard = time.monotonic()
        if not self.alive:
            self.alive = True
            logger.info("worker %s answers on the data path again: readmitted", self.address)
            if self.on_report is not None:
                self.on_report()
        if isinstance(msg, wire.Pong):
            self._answered = max(self._answered, msg.n)
        # one connection: reports come in order; Pong and Transfer carry one too (so the
        # view of an idle worker is fresh: P's blocks free once their transfer ended)
        if isinstance(msg, wire.Step | wire.First) or (
                isinstance(msg, wire.Pong | wire.Transfer) and msg.load):
            self.load = msg.load
            self._acknowledge(msg.load)
            self.busy = False
            if self.on_report is not None:
                self.on_report()
        if isinstance(msg, wire.Pong):
            return
        if isinstance(msg, wire.Step):  # one delivery per request per frame
            mine: dict[str, list[TokenRow]] = {}
            for row in msg.out:
                rows = mine.get(row.request_id)
                if rows is None:
                    mine[row.request_id] = [row]
                else:
                    rows.append(row)
            for rid, rows in mine.items():
                q = self.queues.get(rid)
                if q is not None:
                    q.put_nowait(rows)
        elif isinstance(msg, wire.Transfer):
            if self.on_transfer is not None:
                self.on_transfer(msg.rid, msg.ok, msg.reason)
        elif (q := self.queues.get(getattr(msg, "rid", None))) is not None:
            if isinstance(msg, wire.Error) and msg.code == "busy":
                self.busy = True  # its queue filled since its last report
            q.put_nowait(msg)
        elif isinstance(msg, wire.Error):
            flood.warning("error", "worker %s: %s", self.address, msg.reason)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._watcher.cancel()
        self.sock.close(0)


_TIMEOUT = "proxy-timeout"


def _arm(timeout: float, *queues: Inbox) -> asyncio.TimerHandle:
    """One timer per request (not one per message): `timeout` seconds from now a timeout
    marker lands in each of its queues, failing whichever wait comes first."""
    marker = wire.Error(reason="the worker did not answer in time", retryable=True,
                        code=_TIMEOUT)
    return asyncio.get_running_loop().call_later(
        max(0.0, timeout), lambda: [q.put_nowait(marker) for q in queues])


async def _expect(link: WorkerLink, q: Inbox, *kinds: type) -> Any:
    """The next message of one request from `link`'s worker; a WorkerError blaming that
    worker (`.link`) for an Error, a wrong kind or the request's deadline (`_arm`)."""
    item = q.get_nowait() if not q.empty() else await q.get()
    if isinstance(item, wire.Error) and item.code == _TIMEOUT:
        raise WorkerError("the worker did not answer in time", retryable=True, link=link)
    if isinstance(item, wire.Error):
        raise WorkerError(f"worker failed the request: {item.reason}", item.retryable, item.code,
                          link)
    if not isinstance(item, kinds):
        raise WorkerError(f"unexpected {type(item).__name__} from a worker", link=link)
    return item


async def _step_rows(link: WorkerLink, q: Inbox,
                     running: set[int]) -> list[TokenRow]:
    """The next step's rows of one request (every frame already queued goes out together);
    choices that finished leave `running`. Raises WorkerError on an Error in between."""
    batch = await _expect(link, q, list)  # a list of this request's own (`_handle`)
    while not q.empty():
        item = q.get_nowait()
        if isinstance(item, wire.Error):
            raise WorkerError(f"the worker failed the request: {item.reason}", item.retryable,
                              item.code, link)
        batch.extend(item)
    for r in batch:
        if r.finish_reason is not None:
            running.discard(r.choice_index)
    return batch


async def run_pd(rec: RequestRecord, p: WorkerLink, d: WorkerLink, timeout: float = 600.0,
                 d_kv: str | None = None) -> AsyncIterator[list[TokenRow]]:
    """Yield each step's rows for one request served by P then D (see the module doc).

    `d_kv`: D's KV-transfer address as D reported it, if known. Then P starts at once, with
    the Reserve still on its way to D (D picked with room, so it is reserved in D's next loop
    turn, while P prefills; an offer that overtakes it waits at D's receiver): the prompt
    does not wait for D to end the step it is running. Without it, P starts on D's
    Reserved, which names the address."""
    rid = rec.request_id
    qd, qp = d.subscribe(rid), p.subscribe(rid)
    timer = _arm(timeout, qd, qp)
    running = set(rec.choice_indices())
    touched_p = joined = False
    join: asyncio.Handle | None = None

    def send_join(first: list[TokenRow]) -> None:
        nonlocal joined
        d.send(wire.Join(rid=rid, first=first))
        joined = True

    try:
        if d_kv is not None:  # P first: the prompt is what the first token waits for
            p.send(wire.Prefill(rec=rec, kv=d_kv))
            touched_p = True
        d.send(wire.Reserve(rec=rec))
        msg = await _expect(d, qd, wire.Reserved, wire.Rejected)
        if isinstance(msg, wire.Rejected):  # P (if started) is aborted below
            raise WorkerError(f"D rejected the reservation: {msg.reason}", retryable=True, link=d)
        if not touched_p:
            p.send(wire.Prefill(rec=rec, kv=msg.kv))
            touched_p = True
        elif msg.kv != d_kv:  # D moved its KV endpoint since it reported it (a restart)
            raise WorkerError(f"D's KV address is {msg.kv}, not {d_kv} as reported",
                              retryable=True, link=d)
        rows = (await _expect(p, qp, wire.First)).out
        running.difference_update(r.choice_index for r in rows if r.finish_reason is not None)
        if not running:
            d.send(wire.Abort(rid=rid))  # every choice ended on P: D never decodes it
        else:
            # the Join goes out as soon as this task yields the loop: after the first token
            # is written to the client (TTFT does not wait for it) and before the caller
            # asks for more (this generator resumes only then); D waits for the KV, which
            # takes longer, before it decodes token 2 anyway
            join = asyncio.get_running_loop().call_soon(
                send_join, [_bare(r) for r in rows if r.finish_reason is None])
        yield rows
        while running:
            yield await _step_rows(d, qd, running)
    finally:
        if join is not None and not joined:  # left before the Join went: it never will
            join.cancel()
        if running:  # left early: free everything the request holds
            d.send(wire.Abort(rid=rid))
            if touched_p and not joined:
                p.send(wire.Abort(rid=rid))
        timer.cancel()
        d.unsubscribe(rid)
        p.unsubscribe(rid)


def _bare(row: TokenRow) -> TokenRow:
    """The row as D needs it (the prompt's logprobs are the client's, not D's)."""
    if row.prompt_logprobs is None:
        return row
    return TokenRow(row.request_id, row.choice_index, row.token_id, row.logprobs,
                    row.finish_reason)


async def run_prefill_only(rec: RequestRecord, p: WorkerLink,
                           timeout: float = 600.0) -> AsyncIterator[list[TokenRow]]:
    """Yield the first (and last) rows of a request that ends at its first token (max_tokens
    1: evaluation's prompt logprobs, a classification): P alone, no reservation, no KV
    transfer."""
    rid = rec.request_id
    q = p.subscribe(rid)
    timer = _arm(timeout, q)
    running = set(rec.choice_indices())
    try:
        p.send(wire.Prefill(rec=rec, kv=None))
        rows = (await _expect(p, q, wire.First)).out
        running.difference_update(r.choice_index for r in rows if r.finish_reason is not None)
        if running:  # cannot happen with max_tokens 1: P has no D to hand the rest to
            raise WorkerError("P left a choice running with no decode worker", link=p)
        yield rows
    finally:
        if running:
            p.send(wire.Abort(rid=rid))
        timer.cancel()
        p.unsubscribe(rid)


async def run_both(rec: RequestRecord, w: WorkerLink,
                   timeout: float = 600.0) -> AsyncIterator[list[TokenRow]]:
    """Yield each step's rows for one request served by a both-role worker."""
    q = w.subscribe(rec.request_id)
    timer = _arm(timeout, q)
    running = set(rec.choice_indices())
    try:
        w.send(wire.Generate(rec=rec))
        while running:
            yield await _step_rows(w, q, running)
    finally:
        if running:
            w.send(wire.Abort(rid=rec.request_id))
        timer.cancel()
        w.unsubscribe(rec.request_id)


async def run_resume(rec: RequestRecord, d: WorkerLink, last_token: int,
                     timeout: float = 600.0) -> AsyncIterator[list[TokenRow]]:
    """Continue one choice on a D after its first D died: `rec.output_token_ids` are the
    tokens before `last_token` (the choice's latest). D recomputes prompt + output and draws
    on from the same (seed, choice, position), so the text continues as it would have."""
    rid = rec.request_id
    q = d.subscribe(rid)
    timer = _arm(timeout, q)
    running = {rec.choice_index}
    try:
        d.send(wire.Reserve(rec=rec))
        msg = await _expect(d, q, wire.Reserved, wire.Rejected)
        if isinstance(msg, wire.Rejected):
            raise WorkerError(f"D rejected the re-submission: {msg.reason}", retryable=True,
                              link=d)
        d.send(wire.Join(rid=rid, first=[TokenRow(rid, rec.choice_index, last_token, None, None)]))
        while running:
            yield await _step_rows(d, q, running)
    finally:
        if running:
            d.send(wire.Abort(rid=rid))
        timer.cancel()
        d.unsubscribe(rid)
