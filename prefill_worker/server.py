"""P's step loop: Prefill in, First out, then the KV offered to D.

Per request (`PState`): Prefill {rec, kv} arrives -> PREFILLING: the engine (Role.PREFILL)
schedules the prompt with others under max_num_batched_tokens, chunking long prompts and
reusing prefix-cached blocks -> the step that finishes the prompt draws the n first tokens
-> if a choice is still running and `kv` names a D, READY: the blocks are offered to D in
that same iteration once their KV writes are complete (on GPU a CUDA event, recorded after
the step; a waiter thread wakes the loop when one completes late) -> First goes to the
proxy at once (with P's load) -> OFFERED: the transfer's end (an event that wakes the loop;
Transfer {ok} to the proxy) frees them. Abort frees at any point (an OFFERED request's
blocks once the sender's cancel event comes).
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.common.wire import (
    Abort,
    Connect,
    DataMessage,
    First,
    Prefill,
    TokenRow,
    Transfer,
    WireError,
)
from pdserve.engine.scheduler import Role
from pdserve.engine.sequence import Request
from pdserve.engine.setup import EngineParts
from pdserve.kv_transfer.sender import KVSender
from pdserve.kv_transfer.states import EventKind
from pdserve.service import metrics
from pdserve.service.config import WorkerConfig
from pdserve.service.loop import WorkerLoop

logger = logging.getLogger(__name__)
MAX_CONNECT = 256  # D addresses in one Connect


class PState(enum.Enum):
    PREFILLING = "prefilling"  # queued or running in the engine
    READY = "ready"  # prefilled, blocks held: offered once the KV writes' event completes
    OFFERED = "offered"  # the sender owns the transfer; the blocks are freed on its event


@dataclass(eq=False)
class _PReq:
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


class PrefillLoop(WorkerLoop):
    role = Role.PREFILL

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts)
        self.sender = KVSender(parts.pool, self.compat, name=cfg.worker_name,
                               internal_token=cfg.internal_token or "",
                               transfer_timeout=cfg.transfer_timeout,
                               canary_block=self._canary_block())
        self._ready: list[_PReq] = []  # READY, in order
        self._waiter: _EventWaiter | None = None  # made on the first late KV write
        self._watched: torch.cuda.Event | None = None  # the event the waiter waits for

    def _canary_block(self) -> int | None:
        """GPU: one block taken for good and filled with random bytes, the canary of every
        cuda_ipc handshake (D checks its mapping of our pool by reading it), so a session
        can open before any offer (`Connect`). CPU pools need none."""
        pool = self.parts.pool
        if pool.device.type != "cuda":
            return None
        (block,) = self.engine.bm.allocate([0], block_hashes=[]).block_table
        data = pool.tensor[block].view(-1).view(torch.uint8)
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
        data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=gen))
        return block

    def on_message(self, identity: bytes, msg: DataMessage) -> None:
        if isinstance(msg, Connect):  # the proxy: D's to open KV sessions to, ahead of use
            if len(msg.kv) > MAX_CONNECT or not all(
                    isinstance(a, str) and a.startswith("tcp://") for a in msg.kv):
                raise WireError(f"connect takes at most {MAX_CONNECT} tcp:// addresses")
            for address in msg.kv:
                self.sender.connect(address)
        elif isinstance(msg, Prefill):
            rec = msg.rec
            self.check_new(rec)
            if rec.output_token_ids:
                raise WireError("P prefills new requests only (no output so far)", rec.request_id)
            if self.full(identity, rec.request_id, len(self.engine.scheduler.waiting)):
                return
            try:
                req = self.engine.add_request(rec.prompt_token_ids, rec.params, rec.request_id,
                                              choice_index=rec.choice_index,
                                              cache_salt=rec.cache_salt)
            except ValueError as e:
                raise WireError(str(e), rec.request_id) from e
            self.reqs[rec.request_id] = _PReq(identity, req, msg.kv, time.monotonic())
            metrics.PROMPT_TOKENS.labels("prefill").inc(len(rec.prompt_token_ids))
        elif isinstance(msg, Abort):
            r = self.reqs.get(msg.rid)
            if r is None:
                raise WireError(f"unknown request id {msg.rid!r}", msg.rid)
            if r.state is PState.OFFERED:
                self.sender.cancel(msg.rid, "aborted by the proxy")  # released on its event
            else:
                self.engine.abort(r.req)
                self._ready = [x for x in self._ready if x is not r]
                self.reqs.pop(msg.rid)
                metrics.REQUESTS.labels("prefill", "abort").inc()
        else:
            raise WireError(f"a prefill worker does not take {msg.__struct_config__.tag}",
                            getattr(msg, "rid", None))

    def step(self) -> None:
        outs = self.engine.step()
        event = None
        if self.parts.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        by_rid: dict[str, list[TokenRow]] = {}
        for o in outs:
            by_rid.setdefault(o.request_id, []).append(o)
        now = time.monotonic()
        held = self.engine.scheduler.held
        for rid in by_rid:
            r = self.reqs[rid]
            if rid in held and r.kv is not None:
                r.state, r.event, r.prefilled = PState.READY, event, now
                self._ready.append(r)
        self._offer_ready()  # the KV leaves for D before the first token leaves for the proxy
        load = self.load()
        for rid, rows in by_rid.items():
            r = self.reqs[rid]
            self.send(r.identity, First(rid=rid, out=rows, load=self.load_for(r.identity, load)))
            metrics.TTFT.observe(now - r.received)
            metrics.GENERATION_TOKENS.labels("prefill").inc(len(rows))
            if r.state is PState.PREFILLING:  # every choice finished on P, or no D: nothing
                self.engine.scheduler.release(rid)  # to move
                self.reqs.pop(rid)
                metrics.REQUESTS.labels("prefill", "prefilled").inc()

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
                self._waiter = _EventWaiter(self.waker.wake)
            self._watched = still[-1].event
            self._waiter.watch(self._watched)

    def tick(self) -> None:
        if self._ready:
            self._offer_ready()
        for ev in self.sender.events():
            r = self.reqs.pop(ev.rid, None)
            self.engine.scheduler.release(ev.rid)
            if r is None:
                continue
            ok = ev.kind is EventKind.RELEASED
            metrics.REQUESTS.labels("prefill", "transferred" if ok else "transfer_failed").inc()
            self.send(r.identity, Transfer(rid=ev.rid, ok=ok, reason=ev.reason,
                                           transport=ev.transport,
                                           load=self.load_for(r.identity, self.load())))

    def wake_fds(self) -> list[int]:
        return [self.sender.events_fd]

    def load(self) -> dict[str, Any]:
        s, bm = self.engine.scheduler, self.engine.bm
        pending = sum(q.num_tokens - q.num_computed_tokens for q in [*s.waiting, *s.running])
        return {"role": "prefill", "pending_prefill_tokens": pending,
                "num_requests_waiting": len(s.waiting), "num_requests_running": len(s.running),
                "blocks_awaiting_transfer": sum(len(q.block_table) for q in s.held.values()),
                "kv_cache_usage_perc": bm.usage, "num_free_blocks": bm.num_free_blocks,
                **self.engine.rates.as_load()}

    def info(self) -> dict[str, Any]:
        return {"kv_peers": self.sender.stats()}

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
        self.sender.close()
        super().close()
