"""One access-log line per answered request, on the `pdserve.access` logger at INFO, written
when the response has ended (a stream after its last byte), so nothing is spent on it before
the first token:

    127.0.0.1:50312 "POST /v1/completions" 200 0.093s id=4f3a… prompt=256 completion=8 ttft=0.021s

A generation (the routes of `fast_path.ROUTES`) adds its request id, prompt and completion
tokens and time to first token; a client that left before the answer shows status 499.
`pdserve serve --no-access-log` (or vLLM's `--disable-uvicorn-access-log`) turns it off.
`AccessLogMiddleware` writes the line for what the FastAPI app answers; `FastPath` for its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from pdserve.proxy.middleware import HTTPMiddleware

logger = logging.getLogger("pdserve.access")


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def log_request(scope: Scope, status: int, started: float, gen: Any = None) -> None:
    """The line for one request; `gen`: its `serving.Generation`, if it generated."""
    if not logger.isEnabledFor(logging.INFO):
        return
    took = time.monotonic() - started
    if gen is None:
        logger.info('%s "%s %s" %d %.3fs', client_of(scope), scope["method"], scope["path"],
                    status, took)
        return
    ttft = gen.first_at - started if gen.first_at is not None else None
    logger.info('%s "%s %s" %d %.3fs id=%s prompt=%d completion=%d ttft=%s', client_of(scope),
                scope["method"], scope["path"], status, took, gen.request.request_id,
                gen.num_prompt_tokens, gen.num_completion_tokens,
                "-" if ttft is None else f"{ttft:.3f}s")


class AccessLogMiddleware(HTTPMiddleware):
    """Pure ASGI: the access line of every HTTP request the wrapped app answers."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        status = 500  # unless a response starts

        async def send_noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noted)
        finally:
            log_request(scope, status, started)
