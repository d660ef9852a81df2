"""P's step loop: PREFILL in, FIRST out, then the KV offered to D.

Per request: PREFILL {rec, kv} arrives -> the engine (Role.PREFILL) schedules the prompt with
others under max_num_batched_tokens, chunking long prompts and reusing prefix-cached blocks
-> the step that finishes the prompt draws the n first tokens -> FIRST goes to the proxy at
once (with P's load) -> if a choice is still running and `kv` names a D, the blocks are
offered once their KV writes are complete (a CUDA event on GPU) -> the transfer's end
(TRANSFER {ok} to the proxy) frees them. ABORT frees at any point.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.llm_engine import LLMEngine, Role
from pdserve.engine.record import Msg, RequestRecord, WireError, pack_logprobs
from pdserve.engine.sequence import Request
from pdserve.engine.service import GENERATION_TOKENS, PROMPT_TOKENS, REQUESTS, TTFT, WorkerConfig, WorkerLoop
from pdserve.engine.setup import EngineParts
from pdserve.kv_transfer.sender import KVSender
from pdserve.kv_transfer.states import EventKind

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _PReq:
    identity: bytes
    req: Request
    kv: str | None
    received: float
    offered: bool = False


class PrefillLoop(WorkerLoop):
    role = "prefill"

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts)
        self.engine = LLMEngine(parts, Role.PREFILL)
        self.sender = KVSender(parts.pool, self.compat, name=cfg.worker_name,
                               internal_token=cfg.internal_token or "",
                               transfer_timeout=cfg.transfer_timeout)
        self.reqs: dict[str, _PReq] = {}
        self._ready: list[tuple[str, torch.cuda.Event | None]] = []  # to offer when done

    def on_message(self, identity: bytes, msg: dict) -> None:
        kind = msg["k"]
        if kind is Msg.PREFILL:
            rec = RequestRecord.from_wire(msg.get("rec"))
            kv = msg.get("kv")
            if kv is not None and not isinstance(kv, str):
                raise WireError("prefill: kv must be D's transfer address or null", rec.request_id)
            if rec.request_id in self.reqs:
                raise WireError(f"request id {rec.request_id} is already in flight",
                                rec.request_id)
            if rec.output_token_ids:
                raise WireError("P prefills new requests only (no output so far)", rec.request_id)
            try:
                req = self.engine.add_request(rec.prompt_token_ids, rec.params, rec.request_id,
                                              choice_index=rec.choice_index)
            except ValueError as e:
                raise WireError(str(e), rec.request_id) from e
            self.reqs[rec.request_id] = _PReq(identity, req, kv, time.monotonic())
            PROMPT_TOKENS.labels("prefill").inc(len(rec.prompt_token_ids))
        elif kind is Msg.ABORT:
            rid = msg.get("rid")
            r = self.reqs.get(rid)
            if r is None:
                raise WireError(f"unknown request id {rid!r}", rid if isinstance(rid, str) else None)
            if rid in self.engine.held and r.offered:
                self.sender.cancel(rid, "aborted by the proxy")  # released on its event
            else:
                self.engine.abort(r.req)
                self._ready = [(x, e) for x, e in self._ready if x != rid]
                self.reqs.pop(rid)
                REQUESTS.labels("prefill", "abort").inc()
        else:
            raise WireError(f"a prefill worker does not take {kind.value}", msg.get("rid"))

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        outs = self.engine.step()
        event = None
        if self.parts.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        by_rid: dict[str, list] = {}
        for o in outs:
            by_rid.setdefault(o.request_id, []).append(
                [o.request_id, o.choice_index, o.token_id, pack_logprobs(o.logprobs),
                 o.finish_reason])
        now = time.monotonic()
        load = self.load()
        for rid, rows in by_rid.items():
            r = self.reqs[rid]
            self.send(r.identity, Msg.FIRST, rid=rid, out=rows, load=load)
            TTFT.observe(now - r.received)
            GENERATION_TOKENS.labels("prefill").inc(len(rows))
            if rid in self.engine.held and r.kv is not None:
                self._ready.append((rid, event))
            else:  # every choice finished on P, or no D: nothing to move
                self.engine.release(rid)
                self.reqs.pop(rid)
                REQUESTS.labels("prefill", "prefilled").inc()

    def tick(self) -> None:
        still = []
        for rid, event in self._ready:
            if event is not None and not event.query():
                still.append((rid, event))
                continue
            r = self.reqs[rid]
            seq = self.engine.held[rid]
            self.sender.offer(rid, r.kv, seq.block_table, len(seq.prompt_token_ids))
            r.offered = True
        self._ready = still
        for ev in self.sender.events():
            r = self.reqs.pop(ev.rid, None)
            self.engine.release(ev.rid)
            if r is None:
                continue
            ok = ev.kind is EventKind.RELEASED
            REQUESTS.labels("prefill", "transferred" if ok else "transfer_failed").inc()
            self.send(r.identity, Msg.TRANSFER, rid=ev.rid, ok=ok, reason=ev.reason,
                      transport=ev.transport)

    def load(self) -> dict[str, Any]:
        e, bm = self.engine, self.engine.bm
        pending = sum(s.num_tokens - s.num_computed_tokens for s in [*e.waiting, *e.running])
        return {"role": "prefill", "pending_prefill_tokens": pending,
                "num_requests_waiting": len(e.waiting), "num_requests_running": len(e.running),
                "blocks_awaiting_transfer": sum(len(s.block_table) for s in e.held.values()),
                "kv_cache_usage_perc": bm.usage, "num_free_blocks": bm.num_free_blocks}

    def info(self) -> dict[str, Any]:
        return {"kv_peers": self.sender.stats()}

    def close(self) -> None:
        self.sender.close()
        self.parts.pool.close()
