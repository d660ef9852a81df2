"""A worker process's configuration: its engine's options plus its role, addresses and
transfer settings. Built once by `pdserve prefill|decode|worker` (pdserve/cli.py)."""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from typing import Literal

from pdserve.common.internal_token import placeholder_problem
from pdserve.common.options import option
from pdserve.engine.config import EngineConfig


def _port(v: int | None) -> str | None:
    return None if v is None or 0 <= v < 65536 else "must be a TCP port (0 = any free one)"


@dataclass(frozen=True)
class WorkerConfig(EngineConfig):
    """A worker process: an engine plus its role, addresses and transfer settings."""

    role: Literal["both", "prefill", "decode"] = option(
        "both", help="prefill (P), decode (D), or both in one engine (single-process mode).")
    host: str = option("127.0.0.1", help="Interface for the worker's sockets (internal: "
                       "loopback unless told otherwise).")
    port: int = option(8100, check=_port, help="HTTP port for /health /load /info /metrics.")
    data_port: int | None = option(None, check=_port, help="ZMQ data-path port (default: "
                                   "port + 1).")
    kv_port: int | None = option(None, check=_port, help="D's (and a both-role worker's) "
                                 "KV-transfer port (default: port + 2).")
    kv_data_port: int = option(0, check=lambda v: None if 0 <= v <= 65535 else
                               "must be a port number (0: any free port)",
                               help="D's (and a both-role worker's) tcp KV data port: P's "
                               "data connections carry the KV bytes there, beside the KV "
                               "port's control session. 0: a free port, told to each P in "
                               "the handshake; set it where a firewall opens only known "
                               "ports.")
    kv_tcp_connections: int | None = option(
        None, check=lambda v: None if v is None or 1 <= v <= 64 else "must be 1..64",
        help="P's (and a both-role worker's) tcp data connections per D it sends KV to "
        "(default: min(8, CPU cores)); one connection rarely fills a fast NIC.")
    kv_pull_programs: int = option(8, check=lambda v: None if v >= 0 else "must be >= 0",
                                   help="D (GPU, cuda_ipc): while its engine runs steps, a "
                                   "KV pull's copy kernel runs on at most this many programs "
                                   "(so SMs), leaving the rest to decode (beside a decode "
                                   "step a full-grid copy made it 32x slower on an H100; 8 "
                                   "programs: 1.11-1.13x, the pull at 0.21 of copy speed). "
                                   "An idle D pulls on the whole GPU. 0: the whole GPU "
                                   "always.")
    advertise_host: str | None = option(None, help="Host name peers use to reach this worker "
                                        "(default: --host). 'auto': the address this "
                                        "machine's host name resolves to (a container's own "
                                        "IP: each replica of a scaled compose service "
                                        "advertises itself).")
    internal_token: str | None = option(
        None, secret=True, check=placeholder_problem,
        help="Shared secret the proxy and peers must present on internal channels (required: "
        "without one the worker refuses to start unless --insecure-no-token; placeholders such "
        "as change-me are refused).")
    insecure_no_token: bool = option(False, help="Run with no internal token: every internal "
                                     "check is off (anyone who reaches the worker's ports can "
                                     "generate, read /load and /info, and send KV); logged as "
                                     "a warning at start.")
    name: str | None = option(None, help="Worker name in logs, metrics and handshakes "
                              "(default: role@host:port).")
    kv_transports: list[str] = option(
        default_factory=lambda: ["cuda_ipc", "shm", "tcp"],
        choices=("cuda_ipc", "shm", "tcp"),
        help="D: KV transports it accepts, best first. An empty list (PDSERVE_KV_TRANSPORTS="
        "'') refuses every transfer: D recomputes prompts (testing fallbacks).")
    reservation_timeout: float = option(30.0, check=lambda v: None if v > 0 else "must be > 0",
                                        help="D: seconds a reservation may wait for room and "
                                        "then for P's KV before it is dropped.")
    transfer_timeout: float = option(30.0, check=lambda v: None if v > 0 else "must be > 0",
                                     help="Seconds a started KV transfer may take.")
    warmup: bool = option(True, help="Before serving, run every kernel shape class this role "
                          "uses (prefill chunks short and long, decode, sampling) so no live "
                          "request pays for compiling them; /health answers 503 'warming' "
                          "meanwhile and the proxy routes around it.")
    gpu_turns_notify: list[str] = option(
        default_factory=list, metavar="PATH",
        help="P sharing a GPU with D: the Unix sockets (each D's --gpu-turns-socket) told when "
        "this P has prefill work and when not (pdserve serve --prefill-first sets it).")
    gpu_turns_socket: str | None = option(
        None, metavar="PATH",
        help="D sharing a GPU with P: a Unix socket to bind; while a P there says it has "
        "prefill work, D starts no decode step (for at most --gpu-turns-max-hold-ms at a "
        "time), so prompts run at full speed, as in a both-role worker.")
    stats_interval: float = option(
        10.0, help="Seconds between the stats lines this worker logs while it works "
        "(vLLM's 'Avg prompt throughput: ..., Running: ..., KV cache usage: ...'); 0: none.")
    gpu_turns_max_hold_ms: float = option(
        250.0, check=lambda v: None if v > 0 else "must be > 0",
        help="D: the longest it holds its decode steps for a busy P before it takes one "
        "step anyway.")
    join: list[str] = option(
        default_factory=list, metavar="PROXY_URL",
        help="Once ready, join the proxy at this URL (`pdserve serve --elastic`: POST /workers "
        "with the internal token, retried every second until it answers): a worker "
        "started later needs no proxy restart. This worker's URL as the proxy reaches it: "
        "--advertise-host and --port. (A restarted proxy does not know it: join again.)")
    drain_timeout: float = option(
        25.0, check=lambda v: None if v >= 0 else "must be >= 0",
        help="On SIGTERM: seconds to finish the requests in flight, refusing new ones (the "
        "proxy sends them to other workers; /health says 'draining'), before stopping; 0: "
        "stop at once. A second SIGTERM, or SIGINT, stops at once. (Kubernetes' default "
        "grace period is 30 s.)")
    max_queued_requests: int = option(
        256, check=lambda v: None if v > 0 else "must be > 0",
        help="Requests this worker queues (P: prompts waiting for prefill; D: reservations "
        "waiting for room) before it answers busy: the proxy then tries another worker or "
        "queues the request itself.")

    @property
    def data_address_port(self) -> int:
        return self.data_port if self.data_port is not None else self.port + 1

    @property
    def kv_address_port(self) -> int:
        return self.kv_port if self.kv_port is not None else self.port + 2

    @property
    def public_host(self) -> str:
        if self.advertise_host == "auto":
            return own_address()
        return self.advertise_host or self.host

    @property
    def worker_name(self) -> str:
        return self.name or f"{self.role}@{self.public_host}:{self.port}"


@functools.cache
def own_address() -> str:
    """The address this machine's host name resolves to (`--advertise-host auto`): in a
    container, its IP on the compose network; a loopback answer is refused (peers elsewhere
    could not reach it)."""
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError as e:
        raise ValueError(f"--advertise-host auto: cannot resolve this host's name {name!r} "
                         f"({e}); give the address") from e
    if addr.startswith("127."):
        raise ValueError(f"--advertise-host auto: this host's name {name!r} resolves to "
                         f"{addr}, a loopback address peers cannot reach; give the address")
    return addr
