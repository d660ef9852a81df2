"""D's step loop (and the `both` loop, which shares its streaming half).

Algorithm, per request on D:
1. RESERVE {rec, timeout}: admitted when free blocks and max_num_seqs allow (else queued
   until the timeout, then REJECTED): blocks are allocated for the prompt, the KV receiver
   expects P's offer, and RESERVED {kv address} goes back to the proxy.
2. The KV arrives (receiver event ARRIVED) and JOIN brings P's first tokens; with both, the
   request's running choices join the batch (n > 1 forks over the shared prompt blocks).
   If the transfer failed or expired, the choices join anyway and recompute the prompt in
   chunks under the step budget (counted in kv_transfer_fallback_total).
3. Every step sends one STEP frame per proxy with all its requests' new tokens, logprobs
   and finish reasons, plus D's load report. Preemption and recompute happen inside the
   engine. ABORT frees at once (a reservation whose data may still land is freed on the
   receiver's CANCELLED event).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.llm_engine import LLMEngine, Role, SeqOutput
from pdserve.engine.record import Msg, RequestRecord, WireError, pack_logprobs, unpack_logprobs
from pdserve.engine.sequence import Request
from pdserve.engine.service import (
    E2E,
    FALLBACKS,
    GENERATION_TOKENS,
    ITL,
    PREEMPTIONS,
    PROMPT_TOKENS,
    REQUESTS,
    WorkerConfig,
    WorkerLoop,
)
from pdserve.engine.setup import EngineParts
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.states import EventKind

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _DReq:
    identity: bytes
    rec: RequestRecord
    deadline: float  # for the current stage (queued / waiting for KV and JOIN)
    received: float = field(default_factory=time.monotonic)
    req: Request | None = None
    first: list | None = None  # JOIN's rows, once it came
    kv: str | None = None  # "arrived" | "failed", once the receiver said
    aborting: bool = False
    last_token: dict[int, float] = field(default_factory=dict)


class StreamingLoop(WorkerLoop):
    """The half D and `both` share: running requests, STEP frames, aborts, load."""

    def __init__(self, cfg: WorkerConfig, parts: EngineParts, role: Role):
        super().__init__(cfg, parts)
        self.engine = LLMEngine(parts, role)
        self.reqs: dict[str, _DReq] = {}
        self._preemptions = 0

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        outs: list[SeqOutput] = self.engine.step()
        now = time.monotonic()
        frames: dict[bytes, list] = {}
        for o in outs:
            r = self.reqs.get(o.request_id)
            if r is None:
                continue
            frames.setdefault(r.identity, []).append(
                [o.request_id, o.choice_index, o.token_id, pack_logprobs(o.logprobs),
                 o.finish_reason])
            prev = r.last_token.get(o.choice_index)
            if prev is not None:
                ITL.observe(now - prev)
            r.last_token[o.choice_index] = now
        GENERATION_TOKENS.labels(self.role).inc(len(outs))
        if self.engine.num_preemptions > self._preemptions:
            PREEMPTIONS.inc(self.engine.num_preemptions - self._preemptions)
            self._preemptions = self.engine.num_preemptions
        if frames:
            load = self.load()
            self._seq_frames = getattr(self, "_seq_frames", 0) + 1
            for identity, rows in frames.items():
                self.send(identity, Msg.STEP, seq=self._seq_frames, out=rows, load=load)
        for rid, r in list(self.reqs.items()):
            if r.req is not None and r.req.finished:
                self.reqs.pop(rid)
                reasons = {s.finish_reason for s in r.req.seqs}
                REQUESTS.labels(self.role, "stop" if "stop" in reasons else "length").inc()
                E2E.observe(now - r.received)

    def _generate(self, identity: bytes, msg: dict) -> None:
        """GENERATE {rec}: prefill here and decode (both role; D when the proxy skips P)."""
        rec = RequestRecord.from_wire(msg.get("rec"))
        if rec.request_id in self.reqs:
            raise WireError(f"request id {rec.request_id} is already in flight", rec.request_id)
        if rec.output_token_ids:
            raise WireError("GENERATE takes new requests (re-submissions use RESERVE + JOIN)",
                            rec.request_id)
        try:
            req = self.engine.add_request(rec.prompt_token_ids, rec.params, rec.request_id,
                                          choice_index=rec.choice_index)
        except ValueError as e:
            raise WireError(str(e), rec.request_id) from e
        self.reqs[rec.request_id] = _DReq(identity, rec, float("inf"), req=req)
        PROMPT_TOKENS.labels(self.role).inc(len(rec.prompt_token_ids))

    def _abort_running(self, r: _DReq) -> None:
        self.engine.abort(r.req)
        self.reqs.pop(r.rec.request_id, None)
        REQUESTS.labels(self.role, "abort").inc()

    def _unknown(self, rid: Any) -> WireError:
        return WireError(f"unknown request id {rid!r}", rid if isinstance(rid, str) else None)

    def load(self) -> dict[str, Any]:
        e, bm = self.engine, self.engine.bm
        return {"role": self.role, "kv_cache_usage_perc": bm.usage,
                "num_free_blocks": bm.num_free_blocks,
                "num_requests_running": len(e.running),
                "num_requests_waiting": len(e.waiting), "num_preemptions": e.num_preemptions}


class BothLoop(StreamingLoop):
    """Prefill and decode in one engine: GENERATE {rec} in, STEP frames out."""

    role = "both"

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts, Role.BOTH)

    def on_message(self, identity: bytes, msg: dict) -> None:
        kind = msg["k"]
        if kind is Msg.GENERATE:
            self._generate(identity, msg)
        elif kind is Msg.ABORT:
            r = self.reqs.get(msg.get("rid"))
            if r is None:
                raise self._unknown(msg.get("rid"))
            self._abort_running(r)
        else:
            raise WireError(f"a both-role worker does not take {kind.value}", msg.get("rid"))


class DecodeLoop(StreamingLoop):
    role = "decode"

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts, Role.DECODE)
        self.receiver = KVReceiver(parts.pool, self.compat, host=cfg.host,
                                   port=cfg.kv_address_port, internal_token=cfg.internal_token or "",
                                   transfer_timeout=cfg.transfer_timeout,
                                   transports=tuple(cfg.kv_transports))
        self.kv_address = f"tcp://{cfg.public_host}:{cfg.kv_address_port}"
        self.queue: deque[_DReq] = deque()
        self.num_fallbacks = 0

    def on_message(self, identity: bytes, msg: dict) -> None:
        kind = msg["k"]
        rid = msg.get("rid")
        if kind is Msg.GENERATE:  # the proxy skipped P (short or cached prompt)
            self._generate(identity, msg)
        elif kind is Msg.RESERVE:
            rec = RequestRecord.from_wire(msg.get("rec"))
            if rec.request_id in self.reqs:
                raise WireError(f"request id {rec.request_id} is already in flight",
                                rec.request_id)
            try:
                self.engine.check_prompt(rec.prompt_token_ids + rec.output_token_ids)
            except ValueError as e:
                raise WireError(str(e), rec.request_id) from e
            timeout = msg.get("timeout") or self.cfg.reservation_timeout
            r = _DReq(identity, rec, time.monotonic() + float(timeout))
            self.reqs[rec.request_id] = r
            self.queue.append(r)
            PROMPT_TOKENS.labels("decode").inc(len(rec.prompt_token_ids))
            self._admit()
        elif kind is Msg.JOIN:
            r = self.reqs.get(rid)
            if r is None or r.req is None or r.first is not None:
                raise self._unknown(rid) if r is None else WireError(
                    f"join for {rid} out of order", rid)
            rows = msg.get("first")
            if not isinstance(rows, list) or not all(
                    isinstance(x, list) and len(x) == 3 and isinstance(x[1], int) for x in rows):
                raise WireError("join: first must be [[choice, token, logprobs], ...]", rid)
            vocab = self.parts.model_config.vocab_size
            if any(not 0 <= x[1] < vocab for x in rows):
                raise WireError("join: token id outside the vocabulary", rid)
            r.first = [(int(c), int(t), unpack_logprobs(lp)) for c, t, lp in rows]
            self._try_join(r)
        elif kind is Msg.ABORT:
            r = self.reqs.get(rid)
            if r is None:
                raise self._unknown(rid)
            if r.req is None:  # still queued
                self.queue.remove(r)
                self.reqs.pop(rid)
            elif r.req.request_id in self.engine.reserved:
                if r.kv is None:
                    r.aborting = True
                    self.receiver.cancel(rid, "aborted by the proxy")  # freed on CANCELLED
                else:
                    self._abort_running(r)
            else:
                self._abort_running(r)
        else:
            raise WireError(f"a decode worker does not take {kind.value}", rid)

    def _admit(self) -> None:
        # preempted sequences waiting to recompute come first: new reservations must not take
        # the blocks they need, or a small pool could starve them forever
        while self.queue and not self.engine.waiting:
            r = self.queue[0]
            rec = r.rec
            if not self.engine.can_reserve(len(rec.prompt_token_ids) + len(rec.output_token_ids)):
                return
            self.queue.popleft()
            r.req = self.engine.reserve(rec.prompt_token_ids, rec.params, rec.request_id,
                                        rec.params.seed, rec.output_token_ids, rec.choice_index)
            r.deadline = time.monotonic() + self.cfg.reservation_timeout + self.cfg.transfer_timeout
            if rec.output_token_ids:
                r.kv = "failed"  # a re-submitted record: D recomputes prompt + output
            else:
                self.receiver.reserve(rec.request_id, r.req.seqs[0].block_table,
                                      self.cfg.reservation_timeout)
            self.send(r.identity, Msg.RESERVED, rid=rec.request_id, kv=self.kv_address)

    def _try_join(self, r: _DReq) -> None:
        if r.first is None or r.kv is None or r.aborting:
            return
        if r.kv == "failed" and not r.rec.output_token_ids:
            self.num_fallbacks += 1
            FALLBACKS.inc()
        self.engine.join(r.rec.request_id, r.first, kv_ready=r.kv == "arrived")
        if r.req.finished:
            self.reqs.pop(r.rec.request_id, None)

    def tick(self) -> None:
        for ev in self.receiver.events():
            r = self.reqs.get(ev.rid)
            if r is None:
                continue
            if r.aborting and ev.kind is not EventKind.ARRIVED:
                self._abort_running(r)
                continue
            if ev.kind is EventKind.ARRIVED:
                r.kv = "arrived"
            else:
                logger.warning("transfer of %s %s (%s): D recomputes", ev.rid, ev.kind.value,
                               ev.reason)
                r.kv = "failed"
            if r.aborting:
                self._abort_running(r)
            else:
                self._try_join(r)
        now = time.monotonic()
        while self.queue and self.queue[0].deadline <= now:
            r = self.queue.popleft()
            self.reqs.pop(r.rec.request_id, None)
            self.send(r.identity, Msg.REJECTED, rid=r.rec.request_id,
                      reason="no KV room on this D within the reservation timeout")
        for r in list(self.reqs.values()):
            if r.req is not None and r.req.request_id in self.engine.reserved \
                    and r.deadline <= now and not r.aborting:
                logger.warning("request %s: no JOIN before its deadline; dropped", r.rec.request_id)
                r.aborting = True
                if r.kv is None:
                    self.receiver.cancel(r.rec.request_id, "no JOIN from the proxy")
                else:
                    self._abort_running(r)
        self._admit()

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def load(self) -> dict[str, Any]:
        reserved = sum(len(q.seqs[0].block_table) for q in self.engine.reserved.values())
        base = super().load()
        base["num_requests_waiting"] += len(self.queue) + len(self.engine.reserved)
        return {**base, "num_reserved_blocks": reserved, "kv_transfer_fallbacks":
                self.num_fallbacks, "kv_transports": self.receiver.stats()["peers"]}

    def info(self) -> dict[str, Any]:
        return {"kv_address": self.kv_address, "kv_transports": self.receiver.stats()["peers"]}

    def close(self) -> None:
        self.receiver.close()
        self.parts.pool.close()
