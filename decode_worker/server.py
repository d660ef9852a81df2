"""D's step loop, and the `both` loop: a D that also prefills what it is sent whole, and
prefills for another worker as a P does (`service/prefill_half.py`).

Algorithm, per request on D (`DState`):
1. Reserve {rec, timeout}: QUEUED until free blocks and max_num_seqs allow (else REJECTED at
   the timeout); then RESERVED: blocks are allocated for the prompt, the KV receiver expects
   P's offer, and Reserved {kv address} goes back to the proxy.
2. The KV arrives (receiver event ARRIVED) and Join brings P's first tokens: the request is
   RUNNING, its choices in the batch (n > 1 forks over the shared prompt blocks). If the
   transfer failed or expired, the choices join anyway and recompute the prompt in chunks
   under the step budget (counted in kv_transfer_fallback_total).
3. Every step sends one Step frame per proxy with all its requests' new TokenRows, plus D's
   load report. Preemption and recompute happen inside the engine. Abort frees at once; a
   reservation whose data may still land is ABORTING until the receiver's CANCELLED event.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pdserve.common import wire
from pdserve.common.wire import RequestRecord, TokenRow, WireError
from pdserve.engine.scheduler import Role
from pdserve.engine.sequence import Request
from pdserve.engine.setup import EngineParts
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.states import EventKind
from pdserve.service import metrics
from pdserve.service.config import WorkerConfig
from pdserve.service.loop import WorkerLoop
from pdserve.service.prefill_half import PrefillHalf, PReq

logger = logging.getLogger(__name__)


class DState(enum.Enum):
    QUEUED = "queued"  # waiting for room to reserve, until its deadline
    RESERVED = "reserved"  # blocks reserved; waiting for the KV and for Join
    RUNNING = "running"  # in the engine's batch (joined, or Generate)
    ABORTING = "aborting"  # aborted while P's data may still land: freed on CANCELLED


class KV(enum.Enum):
    PENDING = "pending"  # the receiver has not reported yet
    ARRIVED = "arrived"  # in the reserved blocks
    RECOMPUTE = "recompute"  # the transfer failed (or a re-submitted record): D recomputes


@dataclass(eq=False)
class _DReq:
    identity: bytes
    rec: RequestRecord
    deadline: float  # of the current state (QUEUED, RESERVED)
    state: DState = DState.QUEUED
    req: Request | None = None
    first: list[TokenRow] | None = None  # Join's rows, once it came
    kv: KV = KV.PENDING
    received: float = field(default_factory=time.monotonic)
    last_token: dict[int, float] = field(default_factory=dict)
    join_at: float = 0.0  # handoff timestamps (time.monotonic()): Join came,
    kv_at: float = 0.0  # the KV's arrival reached the loop,
    ready_at: float = 0.0  # both: it joined the batch (0 once its first D token is out)


class StreamingLoop(WorkerLoop):
    """The half D and `both` share: running requests, Step frames, aborts, load."""

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts)
        self._frames = 0

    def step(self) -> None:
        self._stream(self.engine.step())

    def _stream(self, outs: list[TokenRow]) -> None:
        """One Step frame per proxy with its requests' rows; finished requests leave."""
        now = time.monotonic()
        frames: dict[bytes, list[TokenRow]] = {}
        for o in outs:
            r = self.reqs.get(o.request_id)
            if r is None:
                continue
            if r.ready_at:
                metrics.HANDOFF.labels("to_step").observe(now - r.ready_at)
                r.ready_at = 0.0
            frames.setdefault(r.identity, []).append(o)
            prev = r.last_token.get(o.choice_index)
            if prev is not None:
                metrics.ITL.observe(now - prev)
            r.last_token[o.choice_index] = now
        metrics.GENERATION_TOKENS.labels(self.role.value).inc(len(outs))
        if frames:
            load = self.load()
            self._frames += 1
            for identity, rows in frames.items():
                self.send(identity, wire.Step(seq=self._frames, out=rows,
                                              load=self.load_for(identity, load)))
        for rid, r in list(self.reqs.items()):
            if isinstance(r, _DReq) and r.req is not None and r.req.finished:
                self.reqs.pop(rid)
                reasons = {s.finish_reason for s in r.req.seqs}
                metrics.REQUESTS.labels(self.role.value,
                                        "stop" if "stop" in reasons else "length").inc()
                metrics.E2E.observe(now - r.received)

    def _generate(self, identity: bytes, rec: RequestRecord) -> None:
        """Generate {rec}: prefill here and decode (both role; D when the proxy skips P)."""
        self.check_new(rec)
        if rec.output_token_ids:
            raise WireError("generate takes new requests (re-submissions use reserve + join)",
                            rec.request_id)
        if self.full(identity, rec.request_id, len(self.engine.scheduler.waiting)):
            return
        try:
            req = self.engine.add_request(rec.prompt_token_ids, rec.params, rec.request_id,
                                          choice_index=rec.choice_index,
                                          cache_salt=rec.cache_salt)
        except ValueError as e:
            raise WireError(str(e), rec.request_id) from e
        self.reqs[rec.request_id] = _DReq(identity, rec, float("inf"), DState.RUNNING, req)
        metrics.PROMPT_TOKENS.labels(self.role.value).inc(len(rec.prompt_token_ids))

    def _known(self, rid: str) -> _DReq:
        r = self.reqs.get(rid)
        if r is None:
            raise WireError(f"unknown request id {rid!r}", rid)
        return r

    def _abort_running(self, r: _DReq) -> None:
        self.engine.abort(r.req)
        self.reqs.pop(r.rec.request_id, None)
        metrics.REQUESTS.labels(self.role.value, "abort").inc()

    def load(self) -> dict[str, Any]:
        s, bm = self.engine.scheduler, self.engine.bm
        # prompt tokens still to compute here (skipped-P prompts, recomputes), beyond the one
        # token a decoding sequence runs per step
        pending = decoding = 0
        for q in (*s.waiting, *s.running):
            left = q.num_tokens - q.num_computed_tokens
            if left > 1:
                pending += left
        for q in s.running:
            decoding += q.num_tokens - q.num_computed_tokens <= 1
        return {"role": self.role.value, "kv_cache_usage_perc": bm.usage,
                "num_free_blocks": bm.num_free_blocks,
                "num_requests_running": len(s.running),
                # of those, the ones decoding (a prompt chunk beside them is a mixed step)
                "num_requests_decoding": decoding,
                "num_requests_waiting": len(s.waiting), "num_preemptions": s.num_preemptions,
                "pending_prefill_tokens": pending, **self.engine.rates.as_load()}


class DecodeLoop(StreamingLoop):
    role = Role.DECODE

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts)
        self.receiver = KVReceiver(parts.pool, self.compat, host=cfg.host,
                                   port=cfg.kv_address_port, internal_token=cfg.internal_token or "",
                                   transfer_timeout=cfg.transfer_timeout,
                                   transports=tuple(cfg.kv_transports),
                                   data_port=cfg.kv_data_port, busy=self._engine_busy,
                                   pull_programs=cfg.kv_pull_programs)
        self.kv_address = f"tcp://{cfg.public_host}:{cfg.kv_address_port}"
        self.queue: deque[_DReq] = deque()
        self.num_fallbacks = 0

    def _engine_busy(self) -> bool:
        """(the KV receiver's I/O thread) whether the engine runs steps now: a read of the
        scheduler's running list from another thread, a hint for how wide a pull may go."""
        return bool(self.engine.scheduler.running)

    def on_message(self, identity: bytes, msg: wire.DataMessage) -> None:
        if isinstance(msg, wire.Generate):  # the proxy skipped P (short or cached prompt)
            self._generate(identity, msg.rec)
        elif isinstance(msg, wire.Reserve):
            rec = msg.rec
            self.check_new(rec)
            try:
                self.engine.check_prompt(rec.prompt_token_ids + rec.output_token_ids, rec.params)
            except ValueError as e:
                raise WireError(str(e), rec.request_id) from e
            if self.full(identity, rec.request_id, len(self.queue)):
                return
            timeout = msg.timeout or self.cfg.reservation_timeout
            r = _DReq(identity, rec, time.monotonic() + timeout)
            self.reqs[rec.request_id] = r
            self.queue.append(r)
            metrics.PROMPT_TOKENS.labels(self.role.value).inc(len(rec.prompt_token_ids))
            self._admit()
        elif isinstance(msg, wire.Join):
            r = self._known(msg.rid)
            if r.state is not DState.RESERVED or r.first is not None:
                raise WireError(f"join for {msg.rid} out of order", msg.rid)
            vocab = self.parts.model_config.vocab_size
            if any(not 0 <= x.token_id < vocab for x in msg.first):
                raise WireError("join: token id outside the vocabulary", msg.rid)
            r.first, r.join_at = msg.first, time.monotonic()
            self._try_join(r)
        elif isinstance(msg, wire.Abort):
            r = self._known(msg.rid)
            if r.state is DState.QUEUED:
                self.queue.remove(r)
                self.reqs.pop(msg.rid)
            elif r.state is DState.RESERVED and r.kv is KV.PENDING:
                r.state = DState.ABORTING
                self.receiver.cancel(msg.rid, "aborted by the proxy")  # freed on CANCELLED
            elif r.state is not DState.ABORTING:
                self._abort_running(r)
        else:
            raise WireError(f"a {self.role_name} worker does not take "
                            f"{msg.__struct_config__.tag}", getattr(msg, "rid", None))

    role_name = "decode"

    def _admit(self) -> None:
        # preempted sequences waiting to recompute come first: new reservations must not take
        # the blocks they need, or a small pool could starve them forever
        while self.queue and not self.engine.scheduler.waiting:
            r = self.queue[0]
            rec = r.rec
            if not self.engine.scheduler.can_reserve(len(rec.prompt_token_ids)
                                                     + len(rec.output_token_ids)):
                return
            self.queue.popleft()
            r.req = Request(rec.request_id, rec.prompt_token_ids, rec.params, rec.params.seed,
                            cache_salt=rec.cache_salt)
            self.engine.scheduler.reserve(r.req, rec.output_token_ids, rec.choice_index)
            r.state = DState.RESERVED
            r.deadline = time.monotonic() + self.cfg.reservation_timeout + self.cfg.transfer_timeout
            if rec.output_token_ids:
                r.kv = KV.RECOMPUTE  # a re-submitted record: D recomputes prompt + output
            else:
                self.receiver.reserve(rec.request_id, r.req.seqs[0].block_table,
                                      self.cfg.reservation_timeout)
            self.send(r.identity, wire.Reserved(rid=rec.request_id, kv=self.kv_address))

    def _try_join(self, r: _DReq) -> None:
        if r.first is None or r.kv is KV.PENDING or r.state is not DState.RESERVED:
            return
        if r.kv is KV.RECOMPUTE and not r.rec.output_token_ids:
            self.num_fallbacks += 1
            metrics.FALLBACKS.inc()
        self.engine.join(r.rec.request_id, r.first, kv_ready=r.kv is KV.ARRIVED)
        r.state = DState.RUNNING
        if r.kv is KV.ARRIVED:
            r.ready_at = time.monotonic()
            metrics.HANDOFF.labels("kv_after_join").observe(max(0.0, r.kv_at - r.join_at))
            metrics.HANDOFF.labels("join_after_kv").observe(max(0.0, r.join_at - r.kv_at))
        if r.req.finished:
            self.reqs.pop(r.rec.request_id, None)

    def tick(self) -> None:
        for ev in self.receiver.events():
            r = self.reqs.get(ev.rid)
            if r is None:
                continue
            r.kv = KV.ARRIVED if ev.kind is EventKind.ARRIVED else KV.RECOMPUTE
            r.kv_at = time.monotonic()
            if r.kv is KV.ARRIVED:
                metrics.HANDOFF.labels("pull").observe(ev.seconds)
                metrics.HANDOFF.labels("wake").observe(r.kv_at - ev.at)
            if r.state is DState.ABORTING:
                self._abort_running(r)
                continue
            if r.kv is KV.RECOMPUTE:
                logger.warning("transfer of %s %s (%s): D recomputes", ev.rid, ev.kind.value,
                               ev.reason)
            self._try_join(r)
        now = time.monotonic()
        while self.queue and self.queue[0].deadline <= now:
            r = self.queue.popleft()
            self.reqs.pop(r.rec.request_id, None)
            self.send(r.identity, wire.Rejected(
                rid=r.rec.request_id, reason="no KV room on this D within the reservation timeout"))
        for r in list(self.reqs.values()):
            if r.state is DState.RESERVED and r.deadline <= now:
                logger.warning("request %s: no JOIN before its deadline; dropped", r.rec.request_id)
                if r.kv is KV.PENDING:
                    r.state = DState.ABORTING
                    self.receiver.cancel(r.rec.request_id, "no JOIN from the proxy")
                else:
                    self._abort_running(r)
        self._admit()

    def wake_fds(self) -> list[int]:
        return [self.receiver.events_fd]

    def urgent_step(self) -> bool:
        # a joined request waits for token 2: a hold for P's prefill (--prefill-first) would
        # add that prefill to its handoff; the step runs beside it instead
        return any(isinstance(r, _DReq) and r.ready_at for r in self.reqs.values())

    def next_deadline(self) -> float | None:
        waits = [r.deadline for r in self.reqs.values() if r.state is DState.RESERVED]
        if self.queue:
            waits.append(self.queue[0].deadline)
        return min(waits, default=None)

    def load(self) -> dict[str, Any]:
        reserved = self.engine.scheduler.reserved
        base = super().load()
        base["num_requests_waiting"] += len(self.queue) + len(reserved)
        return {**base, "num_reserved_blocks": sum(len(q.seqs[0].block_table)
                                                   for q in reserved.values()),
                "kv_transfer_fallbacks": self.num_fallbacks,
                "kv_transports": self.receiver.stats()["peers"]}

    def info(self) -> dict[str, Any]:
        stats = self.receiver.stats()
        data = self.receiver.data
        # tcp: the data port P's connections land on (--kv-data-port), and how many are open
        return {"kv_address": self.kv_address, "kv_transports": stats["peers"],
                "kv_data_port": data.port if data is not None else None,
                "kv_tcp_connections": stats["tcp_connections"]}

    def close(self) -> None:
        self.receiver.close()
        super().close()


class BothLoop(DecodeLoop):
    """Prefill and decode in one engine: Generate {rec} in, Step frames out. Its roles are
    not fixed (flexible roles, issue 21): it is a D too (Reserve + Join with the KV from a P,
    its receiver at port + 2) and a P too (Prefill {rec, kv}: it prefills beside its own
    work and offers the KV to the D named, as `service/prefill_half.py` does for P), so the
    proxy can pair two both-role workers either way, or a P or D with one."""

    role = Role.BOTH
    role_name = "both-role"

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts)
        self.half = PrefillHalf(self)

    def on_message(self, identity: bytes, msg: wire.DataMessage) -> None:
        if isinstance(msg, wire.Prefill):  # acting as P for another worker
            self.half.prefill(identity, msg, len(self.engine.scheduler.waiting))
        elif isinstance(msg, wire.Connect):
            self.half.connect(msg)
        elif isinstance(msg, wire.Abort) and isinstance(self.reqs.get(msg.rid), PReq):
            self.half.abort(self.reqs[msg.rid])
        else:
            super().on_message(identity, msg)

    def step(self) -> None:
        outs = self.engine.step()
        mine = {o.request_id for o in outs if isinstance(self.reqs.get(o.request_id), PReq)}
        if mine:  # first tokens of prompts prefilled for a D: the KV leaves, First goes out
            self.half.stepped([o for o in outs if o.request_id in mine])
            outs = [o for o in outs if o.request_id not in mine]
        self._stream(outs)

    def tick(self) -> None:
        super().tick()
        self.half.tick()

    def wake_fds(self) -> list[int]:
        return [*super().wake_fds(), self.half.events_fd]

    def load(self) -> dict[str, Any]:
        return {**super().load(), "blocks_awaiting_transfer": self.half.blocks_awaiting_transfer()}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kv_peers": self.half.stats(), "acts_as_prefill": True}

    def close(self) -> None:
        self.half.close()
        super().close()
