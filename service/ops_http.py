"""The worker's operator HTTP surface, served by uvicorn in a thread beside the step loop:
GET /health, /load, /info, /metrics. It only reads the snapshot the loop publishes.

/health and /metrics are open (probes and scrapers); /load and /info need
`Authorization: Bearer <internal token>` when the worker has one. Responses to requests
that send `endpoint-load-metrics-format: text|json` carry `endpoint-load-metrics` (ORCA).
"""

from __future__ import annotations

import hmac
import os
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdserve.common import __version__
from pdserve.service.loop import WorkerLoop, orca_header


def create_ops_app(loop: WorkerLoop) -> FastAPI:
    app = FastAPI(title=f"pdserve {loop.role.value} worker", docs_url=None, redoc_url=None)
    token = loop.cfg.internal_token or ""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token and request.url.path in ("/load", "/info"):
            auth = request.headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(),
                                                                     token.encode()):
                return JSONResponse({"error": {"message": "wrong or missing internal token",
                                               "type": "AuthenticationError", "param": None,
                                               "code": 401}}, status_code=401)
        response = await call_next(request)
        header = orca_header(request.headers.get("endpoint-load-metrics-format"),
                             loop.snapshot["load"])
        if header is not None:
            response.headers["endpoint-load-metrics"] = header
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        h = loop.snapshot["health"]
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/load")
    async def load() -> JSONResponse:
        return JSONResponse(loop.snapshot["load"])

    @app.get("/info")
    async def info() -> JSONResponse:
        p = loop.parts
        return JSONResponse({
            "role": loop.role.value, "name": loop.cfg.worker_name, "version": __version__,
            "pid": os.getpid(),  # a local cluster checks its workers are its own processes
            "compat": loop.compat.to_dict(), "model_path": p.model_path,
            "data_address": loop.data_address, **loop.info(),
            "eos_token_ids": list(p.model_config.eos_token_ids),
            "vocab_size": p.model_config.vocab_size,
            "num_kv_blocks": p.block_manager.num_blocks,
            # what the proxy's admission counts as room (proxy/registry.py Worker.has_room)
            "limits": {"max_num_seqs": p.config.max_num_seqs,
                       "max_num_batched_tokens": p.config.max_num_batched_tokens,
                       "mixed_step_tokens": p.config.mixed_step_tokens,
                       "max_queued_requests": loop.cfg.max_queued_requests},
        })

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the step loop's thread owns signals
        pass


def serve_ops_in_thread(loop: WorkerLoop) -> tuple[_ThreadServer, threading.Thread]:
    cfg = loop.cfg
    server = _ThreadServer(uvicorn.Config(create_ops_app(loop), host=cfg.host, port=cfg.port,
                                          log_level="warning", access_log=False,
                                          timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, name="ops-http", daemon=True)
    thread.start()
    return server, thread
