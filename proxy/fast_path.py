"""The generation routes answered in front of the web framework (issue 17).

POST /v1/completions, /v1/chat/completions and /invocations carry every request and every
streamed token. Under FastAPI each such request crossed a dozen ASGI layers (FastAPI's error,
telemetry and body-limit layers, the request counter, CORS, request id, API key, body limit,
the exception layer, the exit stack, the router, the endpoint wrapper) and each SSE chunk a
`send` wrapper per layer. `FastPath` is the app the server runs: it answers those three
routes itself, by the same rules and mostly the same code, and hands every other request to
the FastAPI app unchanged:
- counted in `pdserve_proxy_http_requests_total` under the route's path and the status;
- `X-Request-Id` on every answer (the client's value when sane, else a new id);
- the API key (401, the same body), the body limit (413 by Content-Length before reading,
  with `Connection: close`, or while reading), the content type, JSON and UTF-8 checks
  (`app.decode_json`), then `OpenAIServer` as the framework's routes call it;
- an `OpenAIError` becomes its JSON body and headers, anything else a logged 500;
- the response goes straight to the server's `send`; then the access-log line
  (`access_log.py`), when on.
Requests it does not take: another method or path, a `root_path`, or an `Origin` header (the
framework's CORS layer answers those). `create_app(..., fast_path=False)` serves everything
through the framework (the tests compare the two).

Attributes it does not have (`add_middleware`, `get`, `router`, `state`, ...) are the FastAPI
app's, so code that assembles the app (`pdserve serve`) treats it as the FastAPI app.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pdserve.proxy import metrics
from pdserve.proxy.access_log import log_request
from pdserve.proxy.app import OpenAIServer, decode_json
from pdserve.proxy.auth import UNAUTHORIZED_BODY, APIKeys
from pdserve.proxy.errors import OpenAIError, error_response
from pdserve.proxy.middleware import body_too_large, request_id
from pdserve.proxy.streaming import ClientDisconnected

logger = logging.getLogger(__name__)

Handler = Callable[[str, Receive, Any], Awaitable[Response]]
ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat",
          "/invocations": "invocation"}
_HEADERS = (b"authorization", b"content-length", b"content-type", b"origin", b"x-request-id")


class FastPath:
    """ASGI app: the generation routes (`ROUTES`) answered here, the rest by `app`."""

    def __init__(self, app: FastAPI, server: OpenAIServer, *, api_keys: APIKeys,
                 max_body_bytes: int, access_log: bool = False):
        self.app = app
        self.access_log = access_log
        self.server = server
        self.keys = api_keys
        self.max_body_bytes = max_body_bytes
        self._handlers: dict[str, Handler] = {path: getattr(server, name)
                                              for path, name in ROUTES.items()}

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" \
                and not scope.get("root_path"):
            handler = self._handlers.get(scope["path"])
            if handler is not None:
                headers: dict[bytes, bytes] = {}
                for k, v in scope["headers"]:
                    if k in _HEADERS and k not in headers:  # the first of each, as Starlette
                        headers[k] = v
                if b"origin" not in headers:
                    await self._serve(handler, scope, receive, send, headers)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, handler: Handler, scope: Scope, receive: Receive, send: Send,
                     headers: dict[bytes, bytes]) -> None:
        started = time.monotonic()
        incoming = headers.get(b"x-request-id")
        rid = request_id(None if incoming is None else incoming.decode("latin-1"))
        response = await self._respond(handler, scope["path"], receive, headers, rid)
        response.raw_headers.append((b"x-request-id", rid.encode("latin-1")))
        metrics.child(metrics.HTTP_REQUESTS, scope["path"], str(response.status_code)).inc()
        try:
            await response(scope, receive, send)
        finally:
            if self.access_log:
                log_request(scope, response.status_code, started,
                            getattr(response, "generation", None))

    async def _respond(self, handler: Handler, path: str, receive: Receive,
                       headers: dict[bytes, bytes], rid: str) -> Response:
        if self.keys and not self.keys.verify(headers.get(b"authorization", b"")
                                              .decode("latin-1")):
            return Response(UNAUTHORIZED_BODY, status_code=401, media_type="application/json",
                            headers={"www-authenticate": "Bearer"})
        try:
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                response = error_response(body_too_large(self.max_body_bytes))
                response.raw_headers.append((b"connection", b"close"))
                return response
            body = await self._read_body(receive)
            data = decode_json(headers.get(b"content-type", b"").decode("latin-1"), body)
            return await handler(rid, receive, data)
        except OpenAIError as e:
            return error_response(e)
        except ClientDisconnected:  # while the body was read: nobody to answer
            return Response(status_code=499)
        except Exception:
            logger.exception("unhandled error on POST %s", path)
            return error_response(OpenAIError("internal server error", status_code=500))

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
