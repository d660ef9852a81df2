"""The proxy's side of the data path: one DEALER link per worker, and the P/D request flow.

`WorkerLink` owns one socket and a reader task that routes each reply to the queue of its
request id (a STEP frame's rows fan out to many requests) and keeps the worker's latest load
report. `run_pd` drives one request through a decode-first reservation:
RESERVE on D -> RESERVED -> PREFILL on P (with D's KV address) -> FIRST (yielded at once)
-> JOIN on D with the still-running choices -> STEP rows until every choice finished.
`run_both` sends GENERATE to a both-role worker. Leaving either generator early (client
gone, error) sends ABORT to every worker involved.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from pdserve.engine.record import Msg, RequestRecord, WireError, decode, encode, unpack_logprobs
from pdserve.engine.sampler import Logprob

logger = logging.getLogger(__name__)
_link_ids = itertools.count()


class WorkerError(RuntimeError):
    """A worker refused or failed a request; `retryable` when another worker may succeed."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class TokenRow:
    """One choice's token from one step (or P's first token)."""

    choice_index: int
    token_id: int
    logprobs: dict[int, Logprob] | None
    finish_reason: str | None


@dataclass(eq=False)
class WorkerLink:
    """DEALER socket to one worker's data path. Create in a running event loop."""

    address: str
    token: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    load_seq: int = 0
    last_heard: float = 0.0  # time.monotonic() of the last frame from the worker

    on_transfer: Any = None  # callback(rid, ok, reason) for P's TRANSFER reports

    def __post_init__(self) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"proxy-{id(self):x}-{next(_link_ids)}".encode())
        self.sock.connect(self.address)
        self.queues: dict[str, asyncio.Queue] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, kind: Msg, **fields: Any) -> None:
        self.sock.send(encode(kind, self.token, **fields))

    def subscribe(self, rid: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = q
        return q

    def unsubscribe(self, rid: str) -> None:
        self.queues.pop(rid, None)

    def fail_all(self, reason: str) -> None:
        """The worker is gone: every request waiting on it fails over (retryable)."""
        for q in self.queues.values():
            q.put_nowait((Msg.ERROR, {"reason": reason, "retryable": True}))

    def _update_load(self, load: Any) -> None:
        if isinstance(load, dict) and load.get("seq", 0) >= self.load_seq:
            self.load, self.load_seq = load, load.get("seq", 0)

    async def _read(self) -> None:
        while True:
            try:
                msg = decode(await self.sock.recv())
            except WireError as e:
                logger.warning("bad frame from worker %s: %s", self.address, e)
                continue
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            self.last_heard = time.monotonic()
            self._update_load(msg.get("load"))
            if msg["k"] is Msg.STEP:
                for row in msg.get("out", []):
                    q = self.queues.get(row[0])
                    if q is not None:
                        q.put_nowait((Msg.STEP, row))
                continue
            if msg["k"] is Msg.TRANSFER:
                if self.on_transfer is not None:
                    self.on_transfer(msg.get("rid"), bool(msg.get("ok")), msg.get("reason", ""))
                continue
            q = self.queues.get(msg.get("rid"))
            if q is not None:
                q.put_nowait((msg["k"], msg))
            elif msg["k"] is Msg.ERROR:
                logger.warning("worker %s: %s", self.address, msg.get("reason"))

    async def close(self) -> None:
        self._reader.cancel()
        self.sock.close(0)


def _row(row: list) -> TokenRow:
    _, choice, token, lp, finish = row
    return TokenRow(choice, token, unpack_logprobs(lp), finish)


async def _expect(q: asyncio.Queue, deadline: float, *kinds: Msg) -> tuple[Msg, Any]:
    timeout = max(0.0, deadline - time.monotonic())
    try:
        kind, msg = await asyncio.wait_for(q.get(), timeout)
    except TimeoutError:
        raise WorkerError("the worker did not answer in time", retryable=True) from None
    if kind is Msg.ERROR:
        raise WorkerError(f"worker failed the request: {msg.get('reason')}",
                          retryable=bool(msg.get("retryable")))
    if kind not in kinds and kind is not Msg.STEP:
        raise WorkerError(f"unexpected {kind.value} from a worker")
    return kind, msg


async def _step_rows(q: asyncio.Queue, deadline: float, running: set[int]) -> list[TokenRow]:
    """The next step's rows of one request (every row already queued goes out together);
    choices that finished leave `running`. Raises WorkerError on an ERROR in between."""
    _, row = await _expect(q, deadline, Msg.STEP)
    batch = [_row(row)]
    while not q.empty():
        kind, item = q.get_nowait()
        if kind is Msg.ERROR:
            raise WorkerError(f"the worker failed the request: {item.get('reason')}",
                              retryable=bool(item.get("retryable")))
        batch.append(_row(item))
    for r in batch:
        if r.finish_reason is not None:
            running.discard(r.choice_index)
    return batch


async def run_pd(rec: RequestRecord, p: WorkerLink, d: WorkerLink,
                 timeout: float = 600.0) -> AsyncIterator[list[TokenRow]]:
    """Yield each step's rows for one request served by P then D (see the module doc)."""
    rid = rec.request_id
    deadline = time.monotonic() + timeout
    qd, qp = d.subscribe(rid), p.subscribe(rid)
    running = set(rec.choice_indices())
    touched_p = joined = False
    try:
        d.send(Msg.RESERVE, rec=rec.to_wire())
        kind, msg = await _expect(qd, deadline, Msg.RESERVED, Msg.REJECTED)
        if kind is Msg.REJECTED:
            raise WorkerError(f"D rejected the reservation: {msg['reason']}", retryable=True)
        p.send(Msg.PREFILL, rec=rec.to_wire(), kv=msg["kv"])
        touched_p = True
        _, msg = await _expect(qp, deadline, Msg.FIRST)
        rows = [_row(r) for r in msg["out"]]
        yield rows
        first = [[r.choice_index, r.token_id, [[t, v.logprob, v.rank]
                  for t, v in r.logprobs.items()] if r.logprobs else None]
                 for r in rows if r.finish_reason is None]
        running -= {r.choice_index for r in rows if r.finish_reason is not None}
        if not running:
            d.send(Msg.ABORT, rid=rid)  # every choice ended on P: D never decodes it
            return
        d.send(Msg.JOIN, rid=rid, first=first)
        joined = True
        while running:
            yield await _step_rows(qd, deadline, running)
    finally:
        if running:  # left early: free everything the request holds
            d.send(Msg.ABORT, rid=rid)
            if touched_p and not joined:
                p.send(Msg.ABORT, rid=rid)
        d.unsubscribe(rid)
        p.unsubscribe(rid)


async def run_both(rec: RequestRecord, w: WorkerLink,
                   timeout: float = 600.0) -> AsyncIterator[list[TokenRow]]:
    """Yield each step's rows for one request served by a both-role worker."""
    rid = rec.request_id
    deadline = time.monotonic() + timeout
    q = w.subscribe(rid)
    running = set(rec.choice_indices())
    try:
        w.send(Msg.GENERATE, rec=rec.to_wire())
        while running:
            yield await _step_rows(q, deadline, running)
    finally:
        if running:
            w.send(Msg.ABORT, rid=rid)
        w.unsubscribe(rid)


async def run_resume(rec: RequestRecord, d: WorkerLink, last_token: int,
                     timeout: float = 600.0) -> AsyncIterator[list[TokenRow]]:
    """Continue one choice on a D after its first D died: `rec.output_token_ids` are the
    tokens before `last_token` (the choice's latest). D recomputes prompt + output and draws
    on from the same (seed, choice, position), so the text continues as it would have."""
    rid = rec.request_id
    deadline = time.monotonic() + timeout
    q = d.subscribe(rid)
    running = True
    try:
        d.send(Msg.RESERVE, rec=rec.to_wire())
        kind, msg = await _expect(q, deadline, Msg.RESERVED, Msg.REJECTED)
        if kind is Msg.REJECTED:
            raise WorkerError(f"D rejected the re-submission: {msg['reason']}", retryable=True)
        d.send(Msg.JOIN, rid=rid, first=[[rec.choice_index, last_token, None]])
        while running:
            _, row = await _expect(q, deadline, Msg.STEP)
            r = _row(row)
            running = r.finish_reason is None
            yield [r]
    finally:
        if running:
            d.send(Msg.ABORT, rid=rid)
        d.unsubscribe(rid)
