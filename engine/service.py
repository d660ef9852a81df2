"""What every worker process (P, D, both) shares: its config, the data-path socket, the ops
HTTP server, Prometheus metrics, the load report and the compatibility record.

Threads: the main thread runs the step loop (`WorkerLoop.run`), which owns the engine and
the data-path ROUTER socket and never blocks on I/O while there is work; uvicorn serves
/health, /load, /info and /metrics from a second thread, reading a snapshot the loop
publishes after every iteration. kv_transfer endpoints run their own I/O thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import Counter, Gauge, Histogram

from pdserve.engine.block_manager import PREFIX_HASH_FUNCTION
from pdserve.engine.config import WorkerConfig
from pdserve.engine.kv_pool import POOL_LAYOUT
from pdserve.engine.record import Msg, WireError, decode, encode
from pdserve.engine.setup import EngineParts
from pdserve.kv_transfer.protocol import PROTOCOL_VERSION, CompatRecord

logger = logging.getLogger(__name__)


# ---- metrics (process-wide) ---------------------------------------------------------------

RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch")
WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting (queue, reservations, transfers)")
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (fraction 0..1)")
REQUESTS = Counter("pdserve_requests", "Requests finished", ["role", "finish_reason"])
PROMPT_TOKENS = Counter("pdserve_prompt_tokens", "Prompt tokens processed", ["role"])
GENERATION_TOKENS = Counter("pdserve_generation_tokens", "Tokens generated", ["role"])
PREEMPTIONS = Counter("pdserve_num_preemptions", "Sequences preempted for recompute")
FALLBACKS = Counter("kv_transfer_fallback", "Prompts D recomputed because the transfer failed")
TTFT = Histogram("pdserve_time_to_first_token_seconds", "Request received to first token",
                 buckets=(.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5,
                          7.5, 10, 20, 40, 80))
ITL = Histogram("pdserve_inter_token_latency_seconds", "Time between a choice's tokens",
                buckets=(.01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5, 5, 10))
E2E = Histogram("pdserve_e2e_request_latency_seconds", "Request received to last token",
                buckets=(.3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240))


def compat_record(parts: EngineParts) -> CompatRecord:
    """The record both ends of a transfer (and the proxy) compare at handshake."""
    mc, spec = parts.model_config, parts.pool.spec
    tok_file = Path(parts.config.tokenizer or parts.model_path) / "tokenizer.json"
    tok_hash = (hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.exists()
                else "none")
    return CompatRecord(
        protocol_version=PROTOCOL_VERSION, model_id=Path(parts.model_path).name,
        config_hash=mc.config_hash, tokenizer_hash=tok_hash,
        dtype=str(spec.dtype).removeprefix("torch."), block_size=spec.block_size,
        pool_layout=POOL_LAYOUT, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, max_model_len=parts.max_model_len,
        prefix_hash=PREFIX_HASH_FUNCTION)


def orca_header(fmt: str | None, load: dict[str, Any]) -> str | None:
    """`endpoint-load-metrics` value as vLLM writes it (Envoy parses both forms)."""
    metrics = {"kv_cache_usage_perc": float(load.get("kv_cache_usage_perc", 0.0)),
               "num_requests_waiting": float(load.get("num_requests_waiting", 0))}
    fmt = (fmt or "").strip().lower()
    if fmt == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in metrics.items())
    if fmt == "json":
        return "JSON " + json.dumps({"named_metrics": metrics})
    return None


class WorkerLoop:
    """The step loop of one worker: data-path socket in, engine steps, replies out.

    Subclasses implement `on_message(identity, msg)`, `tick()` (events, deadlines),
    `has_work()`, `step()` and `load()`. Replies go through `send(identity, kind, **f)`.
    """

    role = "worker"

    def __init__(self, cfg: WorkerConfig, parts: EngineParts):
        self.cfg = cfg
        self.parts = parts
        self.compat = compat_record(parts)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 32 << 20)
        self.sock.bind(f"tcp://{cfg.host}:{cfg.data_address_port}")
        self.data_address = f"tcp://{cfg.public_host}:{cfg.data_address_port}"
        self._token = (cfg.internal_token or "").encode()
        self.stop_event = threading.Event()
        self.snapshot: dict[str, Any] = {"load": {}, "health": {"status": "starting"}}
        self._seq = 0
        self.dead_reason: str | None = None

    # ---- to implement --------------------------------------------------------------------

    def on_message(self, identity: bytes, msg: dict) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Drain transfer events, admit queued work, enforce deadlines. Called every loop."""

    def has_work(self) -> bool:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def load(self) -> dict[str, Any]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release endpoints and the pool (the loop has ended)."""

    # ---- shared --------------------------------------------------------------------------

    def send(self, identity: bytes, kind: Msg, **fields: Any) -> None:
        try:
            self.sock.send_multipart([identity, encode(kind, **fields)], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as e:  # proxy gone or full: it will time out
            logger.warning("cannot reach %r (%s); dropped %s", identity, e, kind.value)

    def _receive(self) -> None:
        while True:
            try:
                identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:
                continue  # a frame without a body: nothing to answer
            try:
                msg = decode(frame)
                if self._token and not hmac.compare_digest(
                        str(msg.get("t", "")).encode(), self._token):
                    raise WireError("wrong internal token", msg.get("rid"))
                self.on_message(identity, msg)
            except WireError as e:
                logger.warning("refused a data-path message: %s", e)
                self.send(identity, Msg.ERROR, rid=e.rid, reason=str(e))

    def publish(self) -> None:
        """Refresh what the HTTP thread serves (a new dict each time: no locking needed)."""
        self._seq += 1
        load = {**self.load(), "seq": self._seq, "time": time.time()}
        RUNNING.set(load.get("num_requests_running", 0))
        WAITING.set(load.get("num_requests_waiting", 0))
        KV_USAGE.set(load.get("kv_cache_usage_perc", 0.0))
        status = "ok" if self.dead_reason is None else "dead"
        self.snapshot = {"load": load, "health": {"status": status, "role": self.role,
                                                  "name": self.cfg.worker_name,
                                                  "reason": self.dead_reason, **self.info()}}

    def run(self) -> None:
        """Until SIGTERM/SIGINT or `stop_event`: receive, tick, step, publish."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        self.publish()
        try:
            while not self.stop_event.is_set():
                # a stalled engine (waiting for blocks a transfer holds) must not spin the CPU
                busy = self.has_work() and not getattr(getattr(self, "engine", None),
                                                       "stalled", False)
                if poller.poll(0 if busy else 5 if self.has_work() else 20):
                    self._receive()
                self.tick()
                if self.has_work():
                    try:
                        self.step()
                    except Exception as e:  # an engine fault: report dead, keep answering
                        logger.exception("engine step failed")
                        self.dead_reason = f"engine step failed: {e}"
                        self.stop_event.set()
                self.publish()
        finally:
            self.close()
            self.sock.close(0)
            self.ctx.term()
