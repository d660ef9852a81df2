"""Start one worker process: engine, step loop for its role, ops HTTP server; stop cleanly
(SIGTERM/SIGINT): the loop ends, transfer endpoints close, the shm pool file is unlinked."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import httpx

from pdserve.common.shm_files import sweep_stale
from pdserve.engine.setup import build_engine
from pdserve.kv_transfer.protocol import new_epoch
from pdserve.service.config import WorkerConfig

logger = logging.getLogger("pdserve.worker")


def run_worker(cfg: WorkerConfig) -> int:
    from pdserve.decode_worker.server import BothLoop, DecodeLoop
    from pdserve.prefill_worker.server import PrefillLoop
    from pdserve.service.ops_http import serve_ops_in_thread

    sweep_stale()
    if cfg.role == "prefill":
        cfg = replace(cfg, enforce_eager=True)  # P never decodes: no decode graphs to capture
    # P's CPU pool lives in /dev/shm so a D on this host can pull from it directly; under
    # tensor parallelism every role's does: the ranks share it, each with its KV heads
    shm = cfg.role == "prefill" or cfg.tensor_parallel_size > 1
    parts = build_engine(cfg, pool_shm_epoch=new_epoch() if shm else None)
    loop_cls = {"prefill": PrefillLoop, "decode": DecodeLoop, "both": BothLoop}[cfg.role]
    try:
        loop = loop_cls(cfg, parts)
    except Exception:
        parts.pool.close()
        parts.close()
        raise
    server, thread = serve_ops_in_thread(loop)  # /health says why it is not ready yet
    try:
        if cfg.warmup:
            try:
                loop.warm_up()
            except Exception:
                loop.shutdown()
                raise
        extra = f" kv={loop.kv_address}" if cfg.role in ("decode", "both") else ""
        logger.info("%s worker %s ready: http=http://%s:%d data=%s%s", cfg.role,
                    cfg.worker_name, cfg.public_host, cfg.port, loop.data_address, extra)
        for proxy in cfg.join:
            join_in_thread(proxy, f"http://{cfg.public_host}:{cfg.port}", cfg.role,
                           cfg.internal_token or "", loop.stop_event)
        loop.run()
    finally:
        server.should_exit = True
        thread.join(5)
    logger.info("%s worker %s stopped", cfg.role, cfg.worker_name)
    return 1 if loop.dead_reason else 0


def join_in_thread(proxy: str, url: str, role: str, token: str, stop) -> threading.Thread:
    """--join: tell a proxy (`pdserve serve --elastic`) this worker is here (POST /workers),
    once it serves; retried every second until the proxy answers (it may start later, as in
    a compose project scaled up). Start-up only: nothing on the request path."""
    def run() -> None:
        tries = 0
        while not stop.is_set():
            try:
                r = httpx.post(proxy.rstrip("/") + "/workers", json={"url": url, "role": role},
                               headers={"authorization": f"Bearer {token}"}, timeout=5)
                if r.status_code in (200, 201):
                    logger.info("joined the proxy at %s", proxy)
                    return
                if r.status_code in (400, 401, 404, 409):  # it will not take us: say why
                    logger.error("the proxy at %s refused to take this worker (%d): %s",
                                 proxy, r.status_code, r.text[:300])
                    return
            except httpx.HTTPError as e:
                if tries % 10 == 0:
                    logger.warning("cannot reach the proxy at %s to join it (%s); retrying",
                                   proxy, e)
            tries += 1
            stop.wait(1.0)

    t = threading.Thread(target=run, name="join-proxy", daemon=True)
    t.start()
    return t
