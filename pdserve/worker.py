"""Start one worker process: engine, step loop for its role, ops HTTP server; stop cleanly
(SIGTERM/SIGINT): the loop ends, transfer endpoints close, the shm pool file is unlinked."""

from __future__ import annotations

import logging
from dataclasses import replace

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
    # P's CPU pool lives in /dev/shm so a D on this host can pull from it directly
    parts = build_engine(cfg, pool_shm_epoch=new_epoch() if cfg.role == "prefill" else None)
    loop_cls = {"prefill": PrefillLoop, "decode": DecodeLoop, "both": BothLoop}[cfg.role]
    try:
        loop = loop_cls(cfg, parts)
    except Exception:
        parts.pool.close()
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
        loop.run()
    finally:
        server.should_exit = True
        thread.join(5)
    logger.info("%s worker %s stopped", cfg.role, cfg.worker_name)
    return 1 if loop.dead_reason else 0
