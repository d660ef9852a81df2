"""Client disconnects: every way a client can leave ends the backend generation at once.

One `DisconnectWatch` per request: a single task waits on `receive()` for `http.disconnect`
for the request's whole life and cancels whatever section runs inline in the request's own
task at that moment (`run()`):
- before the response (queued, prefilling, and all of a non-streaming request's work): the
  cancelled work's `finally` blocks close the backend generator (the engine aborts the
  request) and `run()` raises ClientDisconnected;
- while `SSEResponse` streams (whatever ASGI version the server speaks; Starlette watches
  only below ASGI 2.4): the stream stops and the body iterator is closed, whose `finally`
  closes the backend generator.
A request thus costs one helper task, however it ends.

`sse_stream` is that body iterator: the formatted chunks of one `Generation`, a usage chunk
if asked, an error event if the backend fails mid-way, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.proxy.errors import OpenAIError, sse_error
from pdserve.proxy.formatting import DONE, ResponseFormatter
from pdserve.proxy.serving import Generation, GenerationGroup

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


class DisconnectWatch:
    """Watches one request's `receive` for `http.disconnect` (one task, started by the first
    `run()`, ended by `close()`) and cancels the `run()` in progress when it comes. Read the
    request body before the first `run()`: the watch consumes what `receive` yields."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self.disconnected = False

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a broken receive: nothing more to learn from it
            logger.debug("receive() failed while watching for a disconnect", exc_info=True)
            return
        self.disconnected = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, work: Awaitable[T]) -> T:
        """Await `work` in this task; ClientDisconnected (with `work` cancelled, its
        `finally` blocks run) if the client disconnects first or already had."""
        if self.disconnected:
            if inspect.iscoroutine(work):
                work.close()
            raise ClientDisconnected()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                return await work
            finally:
                self._scope = None
        raise ClientDisconnected()  # the scope caught the watch's cancellation

    async def close(self) -> None:
        """Stop watching (idempotent); the task has ended when this returns."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"
    generation: Generation | None = None  # the request's, for the access log

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 watch: DisconnectWatch | None = None):
        """`on_close` runs however the response ends, even if the client left before the
        body iterator started (closing a never-started generator runs none of its code).
        `watch`: the request's DisconnectWatch, which the response then owns and closes
        (default: its own, on the `receive` it is called with)."""
        super().__init__(content, headers={"Cache-Control": "no-cache", **(headers or {})},
                         media_type=self.media_type)
        self.on_close = on_close
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = self.watch or DisconnectWatch(receive)
        try:
            await watch.run(self.stream_response(send))
        except ClientDisconnected:
            logger.debug("client disconnected mid-stream")
        except OSError:  # the server could not write: the client is gone
            logger.debug("client gone while streaming")
        finally:
            with anyio.CancelScope(shield=True):
                await watch.close()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self.on_close is not None:
                    await self.on_close()
        if self.background is not None:
            await self.background()


async def sse_stream(gen: Generation | GenerationGroup, fmt: ResponseFormatter
                     ) -> AsyncIterator[bytes]:
    """The SSE events of a started generation; closes it however the stream ends."""
    updates = gen.updates()
    try:
        for chunk in fmt.first_chunks(sorted(gen.choices)):
            yield chunk
        continuous = fmt.continuous_usage
        async for batch in updates:
            for upd in batch:
                chunk = fmt.chunk(upd, gen.num_completion_tokens if continuous else 0)
                if chunk is not None:
                    yield chunk
        if fmt.include_usage:
            yield fmt.usage_chunk(gen.num_completion_tokens)
    except OpenAIError as e:
        logger.warning("request %s failed mid-stream: %s", gen.request.request_id, e.message)
        yield sse_error(e)
    except Exception:
        logger.exception("request %s failed mid-stream", gen.request.request_id)
        yield sse_error(OpenAIError("internal server error", status_code=500))
    finally:
        with anyio.CancelScope(shield=True):
            await updates.aclose()
            await gen.aclose()
    yield DONE
