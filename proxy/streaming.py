"""Client disconnects: every way a client can leave ends the backend generation at once.

- Streaming: `SSEResponse` listens for `http.disconnect` while it streams (whatever ASGI
  version the server speaks; Starlette only does so below ASGI 2.4) and always closes its
  body iterator, whose `finally` closes the backend generator (the engine aborts the request).
- Before the first byte (queued, prefilling) and non-streaming requests:
  `cancel_on_disconnect` races the handler's work against `http.disconnect` and cancels it.

`sse_stream` is that body iterator: the formatted chunks of one `Generation`, a usage chunk
if asked, an error event if the backend fails mid-way, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.proxy.errors import OpenAIError, sse_error
from pdserve.proxy.formatting import DONE, ResponseFormatter
from pdserve.proxy.serving import Generation

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None):
        """`on_close` runs however the response ends, even if the client left before the
        body iterator started (closing a never-started generator runs none of its code)."""
        super().__init__(content, headers={"Cache-Control": "no-cache", **(headers or {})},
                         media_type=self.media_type)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the server could not write: the client is gone
                        logger.debug("client gone while streaming")
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()  # disconnected: stop streaming
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            with anyio.CancelScope(shield=True):
                if aclose is not None:
                    await aclose()
                if self.on_close is not None:
                    await self.on_close()
        if self.background is not None:
            await self.background()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raises
    ClientDisconnected). Both helper tasks have ended when this returns or raises."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled ourselves: take both helpers down with us
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    if task in done:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return task.result()
    task.cancel()  # its finally blocks abort the backend request
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def sse_stream(gen: Generation, fmt: ResponseFormatter, prefix_text: str = "") \
        -> AsyncIterator[str]:
    """The SSE events of a started generation; closes it however the stream ends."""
    updates = gen.updates()
    try:
        for chunk in fmt.first_chunks(sorted(gen.choices), prefix_text):
            yield chunk
        async for batch in updates:
            for upd in batch:
                chunk = fmt.chunk(upd)
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
