"""Workers joining and leaving a serving cluster (`pdserve serve --elastic`): the proxy's
membership routes over its Registry (proxy/registry.py: `add`, `start_drain`, and how a
drained worker leaves; `--discover` follows DNS records there instead).

- GET /workers: every worker the proxy knows, as /load lists them (open, like /load);
- POST /workers {"url": "http://host:port", "role"?: "prefill"|"decode"|"both"}: a worker
  joins (201; 200 if its URL is known: a drain of it is called off); it is checked at once
  and takes requests once its /health says ok;
- POST /workers/{name or url}/drain: no new requests for it; it leaves the list once its
  requests have ended (202).
The two POSTs need the cluster's internal token (Authorization: Bearer), and one proxy
process (with --api-server-count N each process keeps its own list: 409). Errors are
OpenAI-shaped.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdserve.proxy.errors import OpenAIError, error_response
from pdserve.proxy.registry import Registry

ROLES = ("unknown", "prefill", "decode", "both")


def add_membership_routes(app: FastAPI, registry: Registry, token: str, *,
                          no_token: bool = False, several_processes: bool = False) -> None:
    def refused(request: Request) -> JSONResponse | None:
        if not no_token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not token or not hmac.compare_digest(given.encode(), token.encode()):
                return error_response(OpenAIError(
                    "membership changes need the cluster's internal token (Authorization: "
                    "Bearer TOKEN)", status_code=401, code="invalid_internal_token"))
        if several_processes:
            return error_response(OpenAIError(
                "membership changes need --api-server-count 1: each proxy process keeps its "
                "own list of workers", status_code=409, code="several_proxy_processes"))
        return None

    @app.get("/workers")
    async def workers() -> JSONResponse:
        return JSONResponse({"workers": registry.snapshot()})

    @app.post("/workers")
    async def add_worker(request: Request) -> JSONResponse:
        if (no := refused(request)) is not None:
            return no
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            problem, param = 'a JSON object with "url": "http://host:port"', "url"
        elif not body["url"].startswith(("http://", "https://")):
            problem, param = f"url {body['url']!r} is not an http(s) URL", "url"
        elif body.get("role", "unknown") not in ROLES:
            problem, param = "role must be prefill, decode or both (or left out: the " \
                "worker's /info says)", "role"
        else:
            w, new = registry.add(body["url"], body.get("role", "unknown"))
            return JSONResponse(w.snapshot(), status_code=201 if new else 200)
        return error_response(OpenAIError(f"POST /workers: {problem}", status_code=400,
                                          param=param))

    @app.post("/workers/{name:path}/drain")
    async def drain_worker(name: str, request: Request) -> JSONResponse:
        if (no := refused(request)) is not None:
            return no
        w = registry.find(name)
        if w is None:
            return error_response(OpenAIError(
                f"no worker named {name!r} (GET /workers lists them)", status_code=404,
                code="unknown_worker"))
        registry.start_drain(w)
        return JSONResponse(w.snapshot(), status_code=202)
