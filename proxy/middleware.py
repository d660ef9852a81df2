"""Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and swallow disconnects).

- `RequestIdMiddleware`: every response carries `X-Request-Id`: the client's value when it is
  sane (printable ASCII, at most 128 characters), else a new uuid4 hex. Handlers read it from
  `request.state.request_id` and use it in the response id (`chatcmpl-<id>`).
- `BodyLimitMiddleware`: bodies over `max_body_bytes` get 413, by Content-Length before the
  handler runs, or while a chunked body is read (the handler's read raises OpenAIError 413).
"""

from __future__ import annotations

import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.proxy.errors import OpenAIError, error_body

_SANE_ID = re.compile(r"[!-~]{1,128}")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        rid = incoming if incoming is not None and _SANE_ID.fullmatch(incoming) \
            else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> OpenAIError:
        return OpenAIError(f"the request body exceeds {self.max_body_bytes} bytes",
                           status_code=413, code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            err = self._too_large()
            body = json.dumps(error_body(err.message, err.type, None, err.code)).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)
