"""`LocalBackend`: an `LLMEngine` in this process, stepped by one background thread: the
`Backend` the OpenAI-surface tests serve `create_app` over, with no worker processes. (The
product's proxy runs no engine; `pdserve worker --role both` is the one-process server.)

How a request moves: `generate()` (event loop) puts an "add" command on a thread-safe
command queue and waits on its own asyncio.Queue. The engine thread drains commands between
steps (add, abort, stop), steps the engine while it has work, and after every step hands each
request's new tokens to its asyncio.Queue with `loop.call_soon_threadsafe` (never blocking the
event loop). A refused `add_request` (ValueError, PromptTooLongError) travels the same way and
raises from the generator's first `__anext__`. Closing the generator early sends "abort".

The engine is touched by the engine thread only (it is not thread-safe); other threads read
a stats snapshot that the engine thread replaces after every loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from pdserve.common.wire import TokenRow
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sequence import Request
from pdserve.engine.setup import EngineParts, build_engine
from pdserve.proxy.backend import BackendError, ChoiceDelta, GenerationRequest, to_deltas

logger = logging.getLogger(__name__)

_DONE = object()  # queued after a request's last deltas


@dataclass(eq=False)
class _Active:
    """One request as the engine thread tracks it."""

    gen: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    req: Request | None = None
    finished: set[int] = field(default_factory=set)  # choices whose finish was delivered


class LocalBackend:
    """Serves one engine built from `engine_config`; call `close()` when done (idempotent).

    Building the engine (model, KV pool, tokenizer) happens in the constructor and takes a
    few seconds for the built-in model: construct it outside the event loop.
    """

    def __init__(self, engine_config: EngineConfig | None = None, *, parts: EngineParts | None = None,
                 model_name: str | None = None):
        self.parts = parts if parts is not None else build_engine(engine_config or EngineConfig(),
                                                                  progress=False)
        self.engine = LLMEngine(self.parts)
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.parts.model_config.vocab_size
        self.tokenizer = self.parts.tokenizer
        self.model_name = model_name or _default_name(self.parts)
        self.model_path = self.parts.model_path
        self._cmds: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._active: dict[str, _Active] = {}  # engine thread only
        self._dead: BaseException | None = None
        self._closed = False
        self._stats: dict[str, Any] = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="pdserve-engine", daemon=True)
        self._thread.start()

    # ---- Backend -------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[list[ChoiceDelta], None]:
        if self._dead is not None:
            raise BackendError(f"the engine stopped: {self._dead}")
        if self._closed:
            raise BackendError("the backend is shut down")
        if req.output_token_ids:
            # resuming needs the engine to take output so far (the workers issue); refusing is
            # better than silently re-drawing from position 0
            raise ValueError("LocalBackend cannot resume a request with output_token_ids")
        active = _Active(req, asyncio.get_running_loop(), asyncio.Queue())
        expected = set(req.choice_indices())
        done = False
        self._cmds.put(("add", active))
        if self._closed and not self._thread.is_alive():
            self._fail_all(BackendError("the backend is shut down"))  # raced close(): no thread
        try:
            while True:
                item = await active.out.get()
                if item is _DONE:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                expected -= {d.choice_index for d in item if d.finish_reason is not None}
                if not expected:
                    done = True
                    return
        finally:
            if not done:  # closed early or cancelled: free the engine's blocks now
                self._cmds.put(("abort", req.request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a running request by id (no-op if unknown); its generator then yields the
        remaining choices with finish_reason "abort"."""
        self._cmds.put(("abort", request_id))

    async def wait_ready(self, timeout: float) -> bool:
        return True  # the engine was built in the constructor

    async def health(self) -> dict[str, Any]:
        return self.stats()

    # ---- operators and tests -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The latest snapshot: healthy, num_running, num_waiting, num_free_blocks, num_blocks,
        num_active (requests with an open generator), num_prefix_hits."""
        return dict(self._stats)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still running end with BackendError."""
        if self._closed:
            return
        self._closed = True
        self._cmds.put(("stop", None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("engine thread did not stop within %.0f s", timeout)
            return
        self._fail_all(BackendError("the backend is shut down"))  # adds that raced the stop

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                # block only when idle; otherwise take what is queued and step
                cmds = [self._cmds.get()] if not self.engine.has_unfinished() else []
                while True:
                    try:
                        cmds.append(self._cmds.get_nowait())
                    except queue.Empty:
                        break
                if any(kind == "stop" for kind, _ in cmds):
                    self._fail_all(BackendError("the backend is shut down"))
                    return
                for kind, arg in cmds:
                    if kind == "add":
                        self._add(arg)
                    else:
                        self._abort(arg)
                if self.engine.has_unfinished():
                    self._expire_deadlines()
                    self._publish(self.engine.step())
                    for rid, why in self.engine.failed:  # aborted by the engine: tell them
                        if (active := self._active.pop(rid, None)) is not None:
                            self._deliver(active, BackendError(f"the engine failed: {why}"))
                    self.engine.failed.clear()
                self._stats = self._snapshot()
        except BaseException as e:  # a bug in the engine: every request fails, health says so
            logger.exception("engine thread failed")
            self._dead = e
            self._fail_all(BackendError(f"the engine failed: {type(e).__name__}: {e}"))
            self._stats = self._snapshot()

    def _add(self, active: _Active) -> None:
        gen = active.gen
        if gen.request_id in self._active:
            self._deliver(active, ValueError(f"request id {gen.request_id!r} is already running"))
            return
        try:
            active.req = self.engine.add_request(gen.prompt_token_ids, gen.params,
                                                 request_id=gen.request_id,
                                                 choice_index=gen.choice_index,
                                                 cache_salt=gen.cache_salt)
        except ValueError as e:  # PromptTooLongError is a ValueError
            self._deliver(active, e)
            return
        self._active[gen.request_id] = active

    def _abort(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is not None and active.req is not None:
            self.engine.abort(active.req)
            self._publish_one(active, [ChoiceDelta(c, [], None, "abort")
                                       for c in active.gen.choice_indices()
                                       if c not in active.finished])

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for rid, active in list(self._active.items()):
            if active.gen.deadline is not None and now >= active.gen.deadline:
                logger.info("request %s passed its deadline: aborted", rid)
                self._abort(rid)

    def _publish(self, rows: list[TokenRow]) -> None:
        """Hand each request its rows of this engine step."""
        by_rid: dict[str, list[TokenRow]] = {}
        for r in rows:
            by_rid.setdefault(r.request_id, []).append(r)
        for rid, mine in by_rid.items():
            if (active := self._active.get(rid)) is not None:
                self._publish_one(active, to_deltas(mine))

    def _publish_one(self, active: _Active, deltas: list[ChoiceDelta]) -> None:
        """Deliver one request's news; forget it once all its choices ended."""
        active.finished.update(d.choice_index for d in deltas if d.finish_reason is not None)
        if deltas:
            self._deliver(active, deltas)
        if active.finished >= set(active.gen.choice_indices()):
            self._active.pop(active.gen.request_id, None)
            self._deliver(active, _DONE)

    def _deliver(self, active: _Active, item: object) -> None:
        try:
            active.loop.call_soon_threadsafe(active.out.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody will read this
            if active.req is not None and active.gen.request_id in self._active:
                self._active.pop(active.gen.request_id)
                self.engine.abort(active.req)

    def _fail_all(self, err: BaseException) -> None:
        for active in list(self._active.values()):
            if active.req is not None:
                try:
                    self.engine.abort(active.req)
                except Exception:  # the engine may be broken; the waiter still gets the error
                    logger.debug("abort after failure raised", exc_info=True)
            self._deliver(active, err)
        self._active.clear()
        # adds still queued behind the stop get the error too
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._deliver(arg, err)

    def _snapshot(self) -> dict[str, Any]:
        bm = self.engine.bm
        return {
            "healthy": self._dead is None and not self._closed,
            "num_running": len(self.engine.scheduler.running),
            "num_waiting": len(self.engine.scheduler.waiting),
            "num_active": len(self._active),
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "kv_cache_usage": bm.usage,
            "num_preemptions": self.engine.scheduler.num_preemptions,
            "num_prefix_hits": bm.num_prefix_hits,  # tokens found in the prefix cache
        }


def _default_name(parts: EngineParts) -> str:
    if parts.config.model is None:
        from pdserve.engine.builtin_model import BUILTIN_MODEL_NAME

        return BUILTIN_MODEL_NAME
    return parts.config.model
