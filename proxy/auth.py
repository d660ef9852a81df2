"""API-key authentication, as vLLM does it but with an OpenAI-shaped 401.

Keys come from `--api-key` (a list) or else PDSERVE_API_KEY; empty values are dropped, and
with no key nothing is checked. Keys are kept only as SHA-256 digests; a presented bearer
token is hashed and compared with `secrets.compare_digest` against every key, OR-ing the
results (no early exit, so timing says nothing about which key came close).

Guarded: /v1/* and SageMaker's /invocations, which generates as /v1 does (vLLM guards only
/v1, so there /invocations generates for anyone: not here). Open: /health, /ping and
/version (probes), /metrics and /load (scrapers), and /tokenize and /detokenize, which run
no model (as in vLLM). OPTIONS (CORS preflight) passes. Behind SageMaker, whose
InvokeEndpoint sends no Authorization header, IAM guards the endpoint: leave the key unset
there, or /invocations answers 401.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.proxy.errors import error_body

API_KEY_ENV = "PDSERVE_API_KEY"
PROTECTED_PREFIXES = ("/v1", "/invocations")


def resolve_api_keys(cli_keys: Iterable[str] | None) -> list[str]:
    """The CLI keys if any, else the environment's (one key); empty values dropped."""
    keys = [k for k in (cli_keys or []) if k]
    if not keys and os.environ.get(API_KEY_ENV):
        keys = [os.environ[API_KEY_ENV]]
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


UNAUTHORIZED_BODY = json.dumps(error_body(
    "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
    "AuthenticationError", None, "invalid_api_key")).encode()
UNAUTHORIZED_HEADERS = [(b"content-type", b"application/json"),
                        (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
                        (b"www-authenticate", b"Bearer")]


class APIKeys:
    """The accepted keys, as digests; `verify` checks an Authorization header's value."""

    def __init__(self, api_keys: Iterable[str]):
        self._digests = [_digest(k) for k in api_keys if k]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def verify(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = _digest(token.strip())
        ok = False
        for d in self._digests:  # every key, no early exit
            ok |= secrets.compare_digest(presented, d)
        return ok


class APIKeyMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming cancellation)."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]):
        self.app = app
        self.keys = APIKeys(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if not path.startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        auth = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        if self.keys.verify(auth):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": UNAUTHORIZED_HEADERS})
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
