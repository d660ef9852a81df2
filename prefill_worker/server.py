"""P's step loop: Prefill in, First out, then the KV offered to D (the machinery, shared with
the both-role loop, is `service/prefill_half.py`; its module docstring has the per-request
states)."""

from __future__ import annotations

import logging
import time
from typing import Any

from pdserve.common.wire import Abort, Connect, DataMessage, Prefill, WireError
from pdserve.engine.scheduler import Role
from pdserve.engine.setup import EngineParts
from pdserve.service.config import WorkerConfig
from pdserve.service.loop import WorkerLoop
from pdserve.service.prefill_half import PrefillHalf

logger = logging.getLogger(__name__)


class PrefillLoop(WorkerLoop):
    role = Role.PREFILL

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        super().__init__(cfg, parts)
        self.half = PrefillHalf(self)
        self.sender = self.half.sender

    def on_message(self, identity: bytes, msg: DataMessage) -> None:
        if isinstance(msg, Connect):
            self.half.connect(msg)
        elif isinstance(msg, Prefill):
            self.half.prefill(identity, msg, len(self.engine.scheduler.waiting))
        elif isinstance(msg, Abort):
            r = self.reqs.get(msg.rid)
            if r is None:
                raise WireError(f"unknown request id {msg.rid!r}", msg.rid)
            self.half.abort(r)
        else:
            raise WireError(f"a prefill worker does not take {msg.__struct_config__.tag}",
                            getattr(msg, "rid", None))

    def step(self) -> None:
        self.half.stepped(self.engine.step())

    def tick(self) -> None:
        self.half.tick()

    def wake_fds(self) -> list[int]:
        return [self.half.events_fd]

    def turn_busy(self, now: float) -> bool:
        return self.has_work() or self.half.kv_leaving_until(now) is not None

    def next_deadline(self) -> float | None:
        # --prefill-first: P's turn ends when its KV has left, or its grace has run out
        return self.half.kv_leaving_until(time.monotonic()) if self.turns_out else None

    def load(self) -> dict[str, Any]:
        s, bm = self.engine.scheduler, self.engine.bm
        pending = sum(q.num_tokens - q.num_computed_tokens for q in [*s.waiting, *s.running])
        return {"role": "prefill", "pending_prefill_tokens": pending,
                "num_requests_waiting": len(s.waiting), "num_requests_running": len(s.running),
                "blocks_awaiting_transfer": self.half.blocks_awaiting_transfer(),
                "kv_cache_usage_perc": bm.usage, "num_free_blocks": bm.num_free_blocks,
                **self.engine.rates.as_load()}

    def info(self) -> dict[str, Any]:
        return {"kv_peers": self.half.stats()}

    def close(self) -> None:
        self.half.close()
        super().close()
