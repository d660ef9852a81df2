"""Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and swallow disconnects).

- `RequestIdMiddleware`: every response carries `X-Request-Id`: the client's value when it is
  sane (printable ASCII, at most 128 characters), else a new uuid4 hex. Handlers read it from
  `request.state.request_id` and use it in the response id (`chatcmpl-<id>`).
- `BodyLimitMiddleware`: bodies over `max_body_bytes` get 413, by Content-Length before the
  handler runs, or while a chunked body is read (the handler's read raises OpenAIError 413).
- `RequestCountMiddleware`: counts every HTTP request in `metrics.HTTP_REQUESTS` by endpoint
  and status. The endpoint is the matched route's path template ("/v1/completions"; a 405
  or a 401 answered before routing still names the route its path matches), "other" when no
  route matches, so unknown paths add no time series. A handler that raises before its
  response starts counts as 500.
"""

from __future__ import annotations

import json
import os
import re

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.proxy import metrics
from pdserve.proxy.errors import OpenAIError, error_body

SANE_ID = re.compile(r"[!-~]{1,128}")


def request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when it is sane, else a new random id."""
    return incoming if incoming is not None and SANE_ID.fullmatch(incoming) \
        else os.urandom(16).hex()


def body_too_large(max_body_bytes: int) -> OpenAIError:
    return OpenAIError(f"the request body exceeds {max_body_bytes} bytes", status_code=413,
                       code="request_too_large")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class HTTPMiddleware:
    """Pure ASGI middleware base: other scopes (lifespan) go straight to the app; `handle`
    gets the HTTP ones."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestIdMiddleware(HTTPMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = _header(scope, b"x-request-id")
        rid = request_id(incoming)
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
        return body_too_large(self.max_body_bytes)

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


def route_template(scope: Scope) -> str:
    """The path template of the route that served (or would serve) `scope`; "other"."""
    route = scope.get("route")  # set by the router when it matched (or matched but for method)
    if route is None:  # answered before routing (401, 413, CORS preflight) or no route: 404
        app = scope.get("app")
        for r in getattr(getattr(app, "router", None), "routes", ()):
            if r.matches(scope)[0] is not Match.NONE:
                route = r
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "other"


class RequestCountMiddleware(HTTPMiddleware):
    """Outermost, so every answer counts (401, 413 and CORS preflights included); counted
    when the response starts (a stream at its first byte), as 500 if the app raises first."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            metrics.HTTP_REQUESTS.labels(route_template(scope), str(status)).inc()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start" and not counted:
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not counted:
                count(500)  # the server error middleware above answers 500
            raise
        if not counted:
            count(500)  # returned without a response: the server answers 500
