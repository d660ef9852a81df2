"""Acting as P: Prefill in, First out, then the prompt's KV offered to a D. Shared by P's loop
(prefill_worker/server.py) and the both-role loop (decode_worker/server.py), which prefills
for another worker when the proxy pairs it as P (flexible roles, issue 21).

Per request (`PState`): Prefill {rec, kv} arrives -> PREFILLING: the engine schedules the
prompt with the rest of its work under max_num_batched_tokens (a both-role engine beside its
own decodes), chunking long prompts and reusing prefix-cached blocks -> the step that
finishes the prompt draws the n first tokens -> if a choice is still running and `kv` names a
D, READY: the blocks are offered to D in that same iteration once their KV writes are
complete (on GPU a CUDA event, recorded after the step; a waiter thread wakes the loop when
one completes late) -> First goes to the proxy at once (with the worker's load) -> OFFERED:
the transfer's end (an event that wakes the loop; Transfer {ok} to the proxy) frees them.
Abort frees at any point (an OFFERED request's blocks once the sender's cancel event comes).
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pdserve.common.wire import Connect, First, Prefill, TokenRow, Transfer, WireError
from pdserve.engine.sequence import Request
from pdserve.kv_transfer.sender import KVSender
from pdserve.kv_transfer.states import EventKind
from pdserve.service import metrics

if TYPE_CHECKING:
    from pdserve.service.loop import WorkerLoop

logger = logging.getLogger(__name__)
MAX_CONNECT = 256  # D addresses in one Connect
# --prefill-first: how long P's turn may outlast its prefill while the KV moves to D (a
# cuda_ipc pull of a 4k-token Llama-3-8B prompt takes ~1.2 ms; a slower or stuck transfer
# must not hold D's decode streams)
TURN_KV_GRACE_S = 0.02


class PState(enum.Enum):
    PREFILLING = "prefilling"  # queued or running in the engine
    READY = "ready"  # prefilled, blocks held: offered once the KV writes' event completes
    OFFERED = "offered"  # the sender owns the transfer; the blocks are freed on its event


@dataclass(eq=False)
class PReq:
    identity: bytes
    req: Request
    kv: str | None  # D's KV-transfer address, or None: nothing goes to a D
    received: float
    state: PState = PState.PREFILLING
    event: torch.cuda.Event | None = None  # GPU: recorded after the prompt's KV writes
    prefilled: float = 0.0  # time.monotonic() when its prompt's step ended


class _EventWaiter:
    """A thread that waits for CUDA events and wakes the step loop when each completes,
    so a READY request is offered the moment its KV writes are done (no polling)."""

    def __init__(self, wake):
        self._wake = wake
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-ready-waiter", daemon=True)
        self._thread.start()

    def watch(self, event: torch.cuda.Event) -> None:
        self._q.put(event)

    def _run(self) -> None:
        while (event := self._q.get()) is not None:
            try:
                event.synchronize()  # releases the GIL
            except Exception:  # noqa: BLE001 - the step loop's next step reports the fault
                logger.exception("waiting for a prefill's KV writes failed")
            self._wake()

    def close(self) -> None:
        self._q.put(None)


class PrefillHalf:
    """The P side of one worker loop. Its requests live in `loop.reqs` as `PReq`s (one id
    space with the loop's other requests); the loop routes Connect, Prefill, an Abort of a
    PReq and the engine's TokenRows of PReqs here."""

    def __init__(self, loop: WorkerLoop):
        self.loop = loop
        self.engine = loop.engine
        self.label = loop.role.value  # metrics: prefill, or both
        cfg = loop.cfg
        self.sender = KVSender(loop.parts.pool, loop.compat, name=cfg.worker_name,
                               internal_token=cfg.internal_token or "",
                               transfer_timeout=cfg.transfer_timeout,
                               canary_block=self._canary_block(),
                               tcp_connections=cfg.kv_tcp_connections)
        self._ready: list[PReq] = []  # READY, in order
        self._waiter: _EventWaiter | None = None  # made on the first late KV write
        self._watched: torch.cuda.Event | None = None  # the event the waiter waits for

    def _canary_block(self) -> int | None:
        """GPU: one block taken for good and filled with random bytes, the canary of every
        cuda_ipc handshake (D checks its mapping of our pool by reading it), so a session
        can open before any offer (`Connect`). CPU pools need none."""
        pool = self.loop.parts.pool
        if pool.device.type != "cuda":
            return None
        (block,) = self.engine.bm.allocate([0], block_hashes=[]).block_table
        data = pool.tensor[block].view(-1).view(torch.uint8)
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
        data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=gen))
        return block

    # ---- messages ------------------------------------------------------------------------

    def connect(self, msg: Connect) -> None:
        """The proxy: D's to open KV sessions to, ahead of use."""
        if len(msg.kv) > MAX_CONNECT or not all(
                isinstance(a, str) and a.startswith("tcp://") for a in msg.kv):
            raise WireError(f"connect takes at most {MAX_CONNECT} tcp:// addresses")
        for address in msg.kv:
            self.sender.connect(address)

    def prefill(self, identity: bytes, msg: Prefill, queued: int) -> None:
        rec = msg.rec
        loop = self.loop
        loop.check_new(rec)
        if rec.output_token_ids:
            raise WireError("P prefills new requests only (no output so far)", rec.request_id)
        if loop.full(identity, rec.request_id, queued):
            return
        try:
            req = self.engine.add_request(rec.prompt_token_ids, rec.params, rec.request_id,
                                          choice_index=rec.choice_index,
                                          cache_salt=rec.cache_salt, prefill_only=True)
        except ValueError as e:
            raise WireError(str(e), rec.request_id) from e
        loop.reqs[rec.request_id] = PReq(identity, req, msg.kv, time.monotonic())
        metrics.PROMPT_TOKENS.labels(self.label).inc(len(rec.prompt_token_ids))

    def abort(self, r: PReq) -> None:
        rid = r.req.request_id
        if r.state is PState.OFFERED:
            self.sender.cancel(rid, "aborted by the proxy")  # released on its event
        else:
            self.engine.abort(r.req)
            self._ready = [x for x in self._ready if x is not r]
            self.loop.reqs.pop(rid)
            metrics.REQUESTS.labels(self.label, "abort").inc()

    # ---- the step ------------------------------------------------------------------------

    def stepped(self, rows: list[TokenRow]) -> None:
        """After an engine step: the TokenRows of this half's requests (their first
        tokens). Marks READY, offers the KV, then sends First to each proxy."""
        event = None
        if self.loop.parts.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        by_rid: dict[str, list[TokenRow]] = {}
        for o in rows:
            by_rid.setdefault(o.request_id, []).append(o)
        now = time.monotonic()
        held = self.engine.scheduler.held
        reqs = self.loop.reqs
        for rid in by_rid:
            r = reqs[rid]
            if rid in held and r.kv is not None:
                r.state, r.event, r.prefilled = PState.READY, event, now
                self._ready.append(r)
        self._offer_ready()  # the KV leaves for D before the first token leaves for the proxy
        load = self.loop.load()
        for rid, rows_ in by_rid.items():
            r = reqs[rid]
            self.loop.send(r.identity, First(rid=rid, out=rows_,
                                             load=self.loop.load_for(r.identity, load)))
            metrics.TTFT.observe(now - r.received)
            metrics.GENERATION_TOKENS.labels(self.label).inc(len(rows_))
            if r.state is PState.PREFILLING:  # every choice finished here, or no D: nothing
                self.engine.scheduler.release(rid)  # to move
                reqs.pop(rid)
                metrics.REQUESTS.labels(self.label, "prefilled").inc()

    def _offer_ready(self) -> None:
        """Offer every READY request whose KV writes are complete; wake up for the rest."""
        still = []
        for r in self._ready:
            if r.event is not None and not r.event.query():
                still.append(r)
                continue
            rid = r.req.request_id
            seq = self.engine.scheduler.held[rid]
            self.sender.offer(rid, r.kv, seq.block_table, seq.num_prompt_tokens)
            r.state = PState.OFFERED
            metrics.HANDOFF.labels("offer_wait").observe(time.monotonic() - r.prefilled)
        self._ready = still
        if still and still[-1].event is not self._watched:  # one stream: the latest
            if self._waiter is None:  # event completes last
                self._waiter = _EventWaiter(self.loop.waker.wake)
            self._watched = still[-1].event
            self._waiter.watch(self._watched)

    def tick(self) -> None:
        """Offer what became ready; end the transfers the sender reports (Transfer out)."""
        if self._ready:
            self._offer_ready()
        for ev in self.sender.events():
            r = self.loop.reqs.pop(ev.rid, None)
            self.engine.scheduler.release(ev.rid)
            if r is None:
                continue
            ok = ev.kind is EventKind.RELEASED
            metrics.REQUESTS.labels(self.label, "transferred" if ok else "transfer_failed").inc()
            self.loop.send(r.identity, Transfer(
                rid=ev.rid, ok=ok, reason=ev.reason, transport=ev.transport,
                load=self.loop.load_for(r.identity, self.loop.load())))

    @property
    def events_fd(self) -> int:
        return self.sender.events_fd

    def kv_leaving_until(self, now: float) -> float | None:
        """--prefill-first: while a prompt prefilled here less than TURN_KV_GRACE_S ago still
        has its KV on the way to D (READY or OFFERED, no Done yet), the time that grace ends
        (the earliest), else None. P's turn on the GPU lasts until its KV has left, so D
        starts no decode step during the pull and the request joins D's next step."""
        until = [r.prefilled + TURN_KV_GRACE_S for r in self.loop.reqs.values()
                 if isinstance(r, PReq) and r.state is not PState.PREFILLING]
        soonest = min((u for u in until if u > now), default=None)
        return soonest

    def blocks_awaiting_transfer(self) -> int:
        return sum(len(q.block_table) for q in self.engine.scheduler.held.values())

    def stats(self) -> dict[str, Any]:
        return self.sender.stats()

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
        self.sender.close()
