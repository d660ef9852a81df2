"""`pdserve serve`: the OpenAI-compatible proxy in front of P/D workers.

With `--prefill URL... --decode URL...` (or `--worker URL...` for both-role workers) it
routes to running workers. With none it starts a local cluster first (`--num-prefill` P and
`--num-decode` D processes of `pdserve worker` on the engine options given here, on loopback
ports: the first free block from 8100 up, or from `--worker-base-port`), stops them on exit, and serves at http://HOST:PORT.
Workers given by URL need their internal token (`--internal-token`), or `--insecure-no-token`
when they run without one: otherwise the proxy refuses to start (common/internal_token.py);
a local cluster draws a random token for its workers.

Startup: workers (if local) -> the proxy's tokenizer and its model's hashes (workers with
another model are refused) -> uvicorn on uvloop and httptools (TLS, CORS, keep-alive,
graceful drain of in-flight streams on SIGTERM), serving at once while health checks admit
workers in the background (/health says why it is 503 until a pair is up).
`--api-server-count N` runs N proxy processes on the same port (SO_REUSEPORT). The proxy
process imports no torch.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import httpx

from pdserve import mps
from pdserve.common import UserError
from pdserve.common.internal_token import (
    INSECURE_FLAG,
    insecure_warning,
    placeholder_problem,
    start_problem,
)
from pdserve.common.options import option
from pdserve.config import ConfigError
from pdserve.engine.config import EngineConfig
from pdserve.supervisor import Managed, Supervisor

logger = logging.getLogger("pdserve.serve")


def _urls(v: list[str]) -> str | None:
    bad = [u for u in v if not u.startswith(("http://", "https://"))]
    return f"not http(s) URLs: {bad}" if bad else None


def parse_discover(entry: str) -> tuple[str, str, int]:
    """"decode=pdserve-decode-pods:8200" -> ("decode", "pdserve-decode-pods", 8200)."""
    role, _, where = entry.partition("=")
    host, _, port = where.rpartition(":")
    if role not in ("prefill", "decode", "both") or not host or not port.isdigit():
        raise ValueError(entry)
    return role, host.strip("[]"), int(port)


def _discover_entries(v: list[str]) -> str | None:
    bad = []
    for entry in v:
        try:
            parse_discover(entry)
        except ValueError:
            bad.append(entry)
    return f"not ROLE=HOST:PORT (ROLE prefill, decode or both): {bad}" if bad else None


def _json_list(v: str) -> str | None:
    try:
        ok = isinstance(json.loads(v), list)
    except ValueError:
        ok = False
    return None if ok else "must be a JSON list, e.g. '[\"*\"]'"


@dataclass(frozen=True)
class ServeConfig(EngineConfig):
    """The proxy's options; the engine options configure a local cluster's workers."""

    host: str = option("127.0.0.1", help="Interface to listen on (0.0.0.0: every interface).")
    port: int = option(8000, help="HTTP port of the OpenAI API.")
    api_key: list[str] = option(default_factory=list, secret=True,
                                help="API key(s) required on /v1/* and /invocations (stored "
                                "hashed).")
    chat_template: str | None = option(
        None, metavar="FILE|TEMPLATE",
        help="The chat template for /v1/chat/completions: a Jinja file, or the template "
        "itself (as vLLM's --chat-template); default: the tokenizer's own.")
    enable_auto_tool_choice: bool = option(
        False, help='Take tool_choice "auto" (the default when a request has tools): the '
        "output is parsed for tool calls with --tool-call-parser (as vLLM's flag).")
    tool_call_parser: str | None = option(
        None, choices=("hermes", "llama3_json"),
        help="How \"auto\" tool choice finds calls in the output: hermes (<tool_call>{...}"
        "</tool_call>) or llama3_json ({\"name\": ..., \"parameters\": {...}}).")
    served_model_name: list[str] = option(
        default_factory=list, metavar="NAME",
        help="Model name(s) clients use; the first one names responses to requests that give "
        "none, and /v1/models lists them all (default: --model as given, and the model "
        "folder's name; pdserve-builtin-tiny for the built-in model).")
    prefill: list[str] = option(default_factory=list, check=_urls, metavar="URL",
                                help="Prefill workers' HTTP URLs (http://host:port).")
    decode: list[str] = option(default_factory=list, check=_urls, metavar="URL",
                               help="Decode workers' HTTP URLs.")
    worker: list[str] = option(default_factory=list, check=_urls, metavar="URL",
                               help="Both-role workers' HTTP URLs.")
    discover: list[str] = option(
        default_factory=list, metavar="ROLE=HOST:PORT", check=_discover_entries,
        help="Workers found by DNS: every address HOST resolves to (a Kubernetes headless "
        "Service: its ready pods) is a ROLE worker (prefill, decode or both) at "
        "http://ADDRESS:PORT, looked up again before each round of health checks: new "
        "addresses join, vanished ones drain and leave. Replicas then scale without "
        "touching the proxy, and several proxy processes follow the same records.")
    elastic: bool = option(
        False, help="Workers join and leave at runtime, the cluster serving on: POST "
        "/workers {\"url\": ...} adds one, POST /workers/NAME/drain drains one (no new "
        "requests; it leaves once its streams end), both with the internal token; a worker "
        "given SIGTERM drains itself. With no worker URLs: start with none (no local "
        "cluster) and serve once one joins. (The endpoints answer without --elastic too, "
        "for workers given by URL.)")
    internal_token: str | None = option(
        None, secret=True, check=placeholder_problem,
        help="Secret shared with the workers: required with worker URLs (unless "
        "--insecure-no-token); a local cluster draws a random one. Placeholders such as "
        "change-me are refused.")
    insecure_no_token: bool = option(False, help="Talk to the workers given by URL with no "
                                     "internal token (they run with --insecure-no-token); "
                                     "logged as a warning at start. A local cluster always "
                                     "has a token.")
    num_prefill: int = option(1, help="Local cluster: prefill workers to start.")
    num_decode: int = option(1, help="Local cluster: decode workers to start.")
    echo_worker_logs: bool = option(True, help="Local cluster: each worker's output also "
                                    "goes to this console, each line prefixed with its role "
                                    "and port (as docker compose does); "
                                    "--no-echo-worker-logs: to its log file only.")
    worker_base_port: int | None = option(
        None, help="Local cluster: first worker port (each worker takes 3: HTTP, data "
        "path, KV). Default: the first block of free ports from 8100 up (printed at "
        "start).")
    local_devices: list[str] = option(default_factory=list, help="Local cluster: devices for "
                                      "the workers in order P..., D... (cycled). With "
                                      "--tensor-parallel-size N each worker takes the next N "
                                      "(its ranks, on consecutive GPUs): --local-devices 0 1 2 "
                                      "3 --tensor-parallel-size 2 puts P on GPUs 0-1 and D on "
                                      "2-3.")
    mps: str = option("auto", choices=("auto", "on", "off"),
                      help="Local cluster: CUDA MPS for workers that share a GPU. auto: start "
                      "a private MPS daemon when two or more local workers share a GPU and "
                      "nvidia-cuda-mps-control is on PATH (their kernels then run side by "
                      "side instead of taking turns in time slices; a fatal GPU fault in one "
                      "then ends its GPU neighbours too); on: always (an error if it cannot); "
                      "off: never. A daemon named by CUDA_MPS_PIPE_DIRECTORY, or the "
                      "system's, is used as it is.")
    mps_decode_percent: int = option(
        100, check=lambda v: None if 1 <= v <= 100 else "must be in 1..100",
        help="Local cluster under MPS: the share of a GPU's SMs a decode worker's kernels "
        "may use (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), leaving the rest to a prefill worker "
        "on the same GPU; 100: no limit.")
    prefill_first: bool = option(
        True, help="Local cluster, a prefill and a decode worker on one GPU: the decode "
        "worker holds its decode steps while the prefill worker prefills and its KV moves "
        "(at most 250 ms at a time; see `pdserve decode --help`, --gpu-turns-*), except the "
        "step that gives a just-joined request its token 2: prompts run at full speed, so "
        "TTFT matches a both-role worker's, and running streams stall meanwhile, as they do "
        "there. --no-prefill-first: both run side by side (TTFT +7 ms on an H100 at 4k-token "
        "prompts, BENCHMARKS.md). Nothing to do where no P and D share a GPU.")
    min_pd_prompt_tokens: int = option(16, help="Prompts shorter than this skip P (D "
                                       "prefills them itself) under --placement threshold.")
    placement: Literal["threshold", "slo"] = option(
        "threshold", help="Who prefills a prompt when there are P and D workers. threshold: "
        "P, unless the prompt is shorter than --min-pd-prompt-tokens or mostly cached on the "
        "chosen D. slo: per request, the placement whose estimated TTFT (and, for D, the gap "
        "its running decodes see) meets --slo-ttft-ms / --slo-itl-ms with the most headroom, "
        "from the workers' measured prefill rates and step times (proxy/placement.py); the "
        "threshold rule until both have measured. Under slo, both-role workers also prefill "
        "for each other (flexible roles) when the worker that would decode cannot meet the "
        "bounds itself.")
    slo_ttft_ms: float = option(1000.0, check=lambda v: None if v > 0 else "must be > 0",
                                help="--placement slo: the time to first token to meet.")
    slo_itl_ms: float = option(25.0, check=lambda v: None if v > 0 else "must be > 0",
                               help="--placement slo: the inter-token gap running streams "
                               "must keep while a D prefills a prompt.")
    max_retries: int = option(2, help="Retries on other workers before a request's first "
                              "token.")
    request_timeout: float = option(600.0, help="Seconds a request may take in all.")
    max_queued_requests: int = option(1024, check=lambda v: None if v > 0 else "must be > 0",
                                      help="Requests that may wait at the proxy for a worker "
                                      "with room; more get 429 with Retry-After at once.")
    max_queue_delay: float = option(20.0, check=lambda v: None if v > 0 else "must be > 0",
                                    help="Seconds a request may wait at the proxy for a worker "
                                    "with room before it gets 429 with Retry-After.")
    health_interval: float = option(1.0, help="Seconds between worker health checks.")
    data_path_timeout: float = option(
        2.0, check=lambda v: None if v > 0 else "must be > 0",
        help="Seconds a worker's step loop may leave the proxy's pings (every 0.5 s) "
        "unanswered before the worker is ejected and its requests fail over (a frozen or "
        "wedged worker); it is readmitted when it answers again. Raise it if one engine "
        "step can take longer.")
    allowed_origins: str = option('["*"]', check=_json_list, help="CORS origins (JSON list).")
    allowed_methods: str = option('["*"]', check=_json_list, help="CORS methods (JSON list).")
    allowed_headers: str = option('["*"]', check=_json_list, help="CORS headers (JSON list).")
    allow_credentials: bool = option(False, help="CORS: allow credentials.")
    ssl_keyfile: str | None = option(None, help="TLS private key file.")
    ssl_certfile: str | None = option(None, help="TLS certificate file.")
    ssl_ca_certs: str | None = option(None, help="CA certificates for client verification.")
    ssl_cert_reqs: int = option(0, choices=(0, 1, 2), help="Client certificates: 0 none, "
                                "1 optional, 2 required (mTLS).")
    max_body_bytes: int = option(4 << 20, help="Largest request body accepted (413 above).")
    keep_alive_timeout: float = option(5.0, help="Seconds an idle keep-alive connection "
                                       "stays open.")
    shutdown_timeout: float = option(30.0, help="On SIGTERM, seconds to drain in-flight "
                                     "streams before closing them.")
    api_server_count: int = option(1, help="Proxy processes sharing the port.")
    stats_interval: float = option(
        10.0, help="Seconds between the stats lines the proxy (and each local worker) logs "
        "while requests run, in vLLM's words ('Avg prompt throughput: ..., Avg generation "
        "throughput: ..., Running: ..., Waiting: ...'); 0: none.")
    access_log: bool = option(True, help="One log line per request when it ends: client, "
                              "method, path, status, duration, and for generations the "
                              "request id, prompt and completion tokens and time to first "
                              "token (logger pdserve.access); --no-access-log: none (vLLM's "
                              "--disable-uvicorn-access-log does the same).")
    uvloop: bool = option(True, help="Run the proxy's event loop on uvloop (--no-uvloop: "
                          "asyncio's); asyncio's, with a warning, if uvloop is not installed.")
    httptools: bool = option(True, help="Parse HTTP with httptools (--no-httptools: h11); h11, "
                             "with a warning, if httptools is not installed.")


# ---- local cluster ------------------------------------------------------------------------

_WORKER_FIELDS = [f for f in EngineConfig.__dataclass_fields__ if f not in ("device",)]


def _worker_cmd(cfg: ServeConfig, role: str, port: int, device: str | None,
                memory_share: float | None = None) -> list[str]:
    """`memory_share`: this worker's --gpu-memory-utilization where workers split a GPU."""
    # the internal token travels in the environment, not argv (visible to every user in ps)
    cmd = [sys.executable, "-m", "pdserve", "worker", "--role", role, "--port", str(port)]
    defaults = EngineConfig.__dataclass_fields__
    for name in _WORKER_FIELDS:
        value = getattr(cfg, name)
        if name == "gpu_memory_utilization" and memory_share is not None:
            value = memory_share
        if value == defaults[name].default or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd += [flag, str(value)]
    if cfg.stats_interval != 10.0:  # the workers' own default
        cmd += ["--stats-interval", str(cfg.stats_interval)]
    if device is not None:
        cmd += ["--device", device]
    return cmd


def _local_roles(cfg: ServeConfig) -> list[tuple[str, str | None]]:
    """(role, --device or None for the config's own) of each local worker, in start order.
    Under tensor parallelism (N ranks) --local-devices is read N entries per worker (cycled):
    a worker's ranks run on its --device and the GPUs after it (engine/setup.py
    rank_devices), so each group must be one GPU and the next N - 1, or all the CPU."""
    roles = ["prefill"] * cfg.num_prefill + ["decode"] * cfg.num_decode
    if not cfg.local_devices:
        return [(role, None) for role in roles]
    tp = cfg.tensor_parallel_size
    devs = cfg.local_devices
    if len(devs) % tp:
        raise ConfigError(f"--local-devices lists {len(devs)} devices: with "
                          f"--tensor-parallel-size {tp} give {tp} per worker (each worker's "
                          "ranks)", "local_devices")
    groups = [devs[i:i + tp] for i in range(0, len(devs), tp)]
    for group in groups if tp > 1 else []:
        if all(d == "cpu" for d in group):
            continue
        first = mps.gpu_index(group[0], True)
        if first is None or [mps.gpu_index(d, True) for d in group] != list(
                range(first, first + tp)):
            want = " ".join(str((first or 0) + r) for r in range(tp))
            raise ConfigError(f"--local-devices {' '.join(group)}: one worker's {tp} "
                              f"tensor-parallel ranks run on consecutive GPUs from its first "
                              f"(e.g. {want}), or all on cpu", "local_devices")
    return [(role, groups[i % len(groups)][0]) for i, role in enumerate(roles)]


def local_tp_problem(cfg: ServeConfig, local: list[tuple[str, str | None]],
                     has_gpu: bool) -> str | None:
    """Why the local workers cannot run at --tensor-parallel-size, or None: a GPU P/D
    worker refuses tp > 1 at start (engine/setup.py), so a local cluster on GPUs says so
    before it starts any."""
    tp = cfg.tensor_parallel_size
    if tp == 1:
        return None
    on_gpu = sorted({str(d or cfg.device) for _, d in local
                     if mps.gpu_index(d or cfg.device, has_gpu) is not None})
    if not on_gpu:
        return None
    return (f"--tensor-parallel-size {tp} with workers on GPU ({', '.join(on_gpu)}): P/D "
            "workers shard a model on the CPU only for now (moving the KV of GPU shards is "
            "not built yet); run tp 1 with a GPU per worker (--local-devices 0 1), or the "
            "workers on the CPU (--device cpu)")


def gpu_memory_shares(cfg: ServeConfig, local: list[tuple[str, str | None]],
                      has_gpu: bool) -> dict[int, float]:
    """--gpu-memory-utilization is per worker (its weights, activations and KV pool, as in
    vLLM). Local workers that share a GPU split the default (0.9) between them: the
    --gpu-memory-utilization of each such worker, by start index. A value the user set is
    each worker's own; several of them that ask for more than the whole GPU are a
    ConfigError. Nothing to split with --kv-cache-memory-bytes (an explicit pool size)."""
    by_gpu: dict[int, list[int]] = {}
    for i, (_, d) in enumerate(local):
        g = mps.gpu_index(d or cfg.device, has_gpu)
        if g is not None:
            by_gpu.setdefault(g, []).append(i)
    default = EngineConfig.__dataclass_fields__["gpu_memory_utilization"].default
    shares: dict[int, float] = {}
    for g, idx in by_gpu.items():
        if len(idx) < 2 or cfg.kv_cache_memory_bytes is not None:
            continue
        if cfg.gpu_memory_utilization != default:
            if cfg.gpu_memory_utilization * len(idx) > 1:
                raise ConfigError(
                    f"--gpu-memory-utilization {cfg.gpu_memory_utilization} is each worker's "
                    f"share; {len(idx)} local workers on GPU {g} would ask for "
                    f"{cfg.gpu_memory_utilization * len(idx):.2f} of it: give at most "
                    f"{1 / len(idx):.2f} (or leave it out: they split {default})",
                    "gpu_memory_utilization")
            continue
        for i in idx:
            shares[i] = round(default / len(idx), 4)
    return shares


def _gpu_turns(cfg: ServeConfig, local: list[tuple[str, str | None]], log_dir: Path
               ) -> dict[int, list[str]]:
    """--prefill-first: the turn-taking flags of each local worker (by start index) that
    shares its GPU with a worker of the other role (service/gpu_turns.py)."""
    has_gpu = mps.gpu_present()
    gpus = [mps.gpu_index(d or cfg.device, has_gpu) for _, d in local]
    sockets = {i: str(log_dir / f"gpu-turns-{i}.sock") for i, (role, _) in enumerate(local)
               if role == "decode" and gpus[i] is not None}
    flags: dict[int, list[str]] = {}
    for i, (role, _) in enumerate(local):
        if role != "prefill" or gpus[i] is None:
            continue
        peers = [j for j in sockets if gpus[j] == gpus[i]]
        if peers:
            flags[i] = ["--gpu-turns-notify", *(sockets[j] for j in peers)]
            for j in peers:
                flags[j] = ["--gpu-turns-socket", sockets[j]]
    if not flags:
        logger.debug("prefill first: no prefill and decode worker share a GPU here")
    return flags


def start_mps(cfg: ServeConfig, log_dir: Path) -> tuple[mps.Daemon | None, bool]:
    """Per --mps: start a private MPS daemon for the local workers when they share a GPU.
    Returns the daemon (None if none was started) and whether the workers run under MPS."""
    devices = [d or cfg.device for _, d in _local_roles(cfg)]
    try:
        p = mps.plan(cfg.mps, devices)
    except mps.MpsError as e:
        raise ConfigError(str(e), "mps") from e
    if not p.start:
        quiet = cfg.mps == "auto" and not (p.warn or p.under)  # nothing shared: nothing to say
        (logger.warning if p.warn else logger.debug if quiet else logger.info)("%s", p.reason)
        return None, p.under
    logger.info("%s", p.reason)
    daemon = mps.Daemon(log_dir)
    try:
        daemon.start()
    except mps.MpsError as e:
        if cfg.mps == "on":
            raise UserError(f"--mps on: the MPS daemon did not start: {e}") from e
        logger.warning("the MPS daemon did not start, so the workers share their GPU in time "
                       "slices: %s", e)
        return None, False
    return daemon, True


DEFAULT_WORKER_PORT = 8100


def free_port_block(start: int, n: int, host: str = "127.0.0.1") -> int:
    """The first base port p >= `start` with p .. p+n-1 all free on `host` now (each tried
    by binding it); a UserError if none is below 65536."""
    base = start
    while base + n <= 65536:
        held = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, p))
            return base
        except OSError:
            base = p + 1  # the block cannot contain the port that is taken
        finally:
            for s in held:
                s.close()
    raise UserError(f"no {n} free consecutive ports from {start} up: choose them with "
                    "--worker-base-port")


def start_local_cluster(cfg: ServeConfig, log_dir: Path, mps_env: dict[str, str] | None = None,
                        ) -> tuple[ServeConfig, list[Managed]]:
    """Start P and D workers; returns the config pointing at them and the started workers
    (what the supervisor restarts). `mps_env`: the MPS daemon's variables, when the workers
    run under one."""
    workers, urls = [], {"prefill": [], "decode": []}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PDSERVE_INTERNAL_TOKEN": cfg.internal_token or ""}
    env.pop("PDSERVE_CONFIG", None)
    env.pop("PDSERVE_INSECURE_NO_TOKEN", None)  # they have a token: the flag would contradict it
    if mps_env is not None:
        env.update(mps_env)
    local = _local_roles(cfg)
    turns = _gpu_turns(cfg, local, log_dir) if cfg.prefill_first else {}
    shares = gpu_memory_shares(cfg, local, mps.gpu_present())
    for share in sorted(set(shares.values())):
        n = sum(1 for v in shares.values() if v == share)
        logger.info("%d local workers on shared GPUs: --gpu-memory-utilization %.4g each (of "
                    "the default %.2g; a value given is each worker's own)", n, share,
                    EngineConfig.__dataclass_fields__["gpu_memory_utilization"].default)
    base = cfg.worker_base_port
    if base is None:
        base = free_port_block(DEFAULT_WORKER_PORT, 3 * len(local))
        logger.info("local workers on ports %d-%d (the first free block from %d; "
                    "--worker-base-port chooses)", base, base + 3 * len(local) - 1,
                    DEFAULT_WORKER_PORT)
    for i, (role, device) in enumerate(local):
        port = base + 3 * i
        wenv = env
        if mps_env is not None and role == "decode" and cfg.mps_decode_percent < 100:
            wenv = {**env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(cfg.mps_decode_percent)}
        w = Managed(role, port, _worker_cmd(cfg, role, port, device, shares.get(i))
                    + turns.get(i, []), wenv,
                    log_dir / f"{role}-{port}.log",
                    echo=sys.stderr if cfg.echo_worker_logs else None)
        w.log_path.write_text("")
        w.start()
        workers.append(w)
        urls[role].append(w.url)
        logger.info("started local %s worker on port %d (log %s)", role, port, w.log_path)
    return replace(cfg, prefill=urls["prefill"], decode=urls["decode"]), workers


def _check_own(url: str, w: Managed | None, token: str) -> None:
    """A UserError unless the worker answering at `url` is the process we started (another
    cluster's worker on a port ours could not take would otherwise be served as ours)."""
    if w is None or w.proc is None:
        return
    port = url.rsplit(":", 1)[1]
    r = httpx.get(url + "/info", timeout=5, headers={"Authorization": f"Bearer {token}"})
    pid = r.json().get("pid") if r.status_code == 200 else None
    if r.status_code != 200 or pid != w.proc.pid:
        raise UserError(f"port {port} is held by another process (a worker that is not this "
                        f"cluster's answers there); choose free worker ports with "
                        f"--worker-base-port (this cluster's {w.role} worker's log: "
                        f"{w.log_path})")


def wait_for_workers(cfg: ServeConfig, workers: list[Managed], timeout: float = 600.0) -> None:
    """Until every worker answers /health; a UserError with its log's end if one exits."""
    urls = cfg.prefill + cfg.decode + cfg.worker
    by_url = {w.url: w for w in workers}
    start = time.monotonic()
    end = start + timeout
    pending = list(urls)
    while pending:
        for w in workers:
            if w.proc.poll() is not None:
                raise UserError(f"a local worker exited with code {w.proc.returncode}; the end "
                                f"of its log {w.log_path}:\n{w.log_end()}")
        try:
            r = httpx.get(pending[0] + "/health", timeout=2)
            if r.status_code == 200:
                _check_own(pending[0], by_url.get(pending[0]), cfg.internal_token or "")
                warm = r.json().get("warmup_s")
                logger.info("worker %s ready %.1f s after launch%s", pending.pop(0),
                            time.monotonic() - start,
                            f" (warm-up {warm:.1f} s)" if isinstance(warm, int | float) else "")
                continue
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > end:
            raise UserError(f"worker {pending[0]} not healthy after {timeout:.0f} s")
        time.sleep(0.25)


def stop_processes(procs: list, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


# ---- the proxy ----------------------------------------------------------------------------

def read_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it names no file (a value
    with Jinja markup is a template; anything else that is not a file is an error)."""
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a long inline template is no path
        pass
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"--chat-template {value!r}: no such file, and not a Jinja template",
                      "chat_template")


def build_app(cfg: ServeConfig, supervisor: Supervisor | None = None):
    """The FastAPI app over a ClusterBackend for `cfg`'s workers (started in its lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from pdserve.common.compat import model_identity
    from pdserve.common.stats_line import StatsLine
    from pdserve.engine.builtin_model import BUILTIN_MODEL_NAME, builtin_model_path
    from pdserve.engine.model_config import ModelConfig
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.proxy import metrics
    from pdserve.proxy.app import create_app
    from pdserve.proxy.cluster_backend import ClusterBackend
    from pdserve.proxy.membership import add_membership_routes
    from pdserve.proxy.middleware import RequestCountMiddleware
    from pdserve.proxy.placement import SLO
    from pdserve.proxy.registry import Registry

    model_path = cfg.model or str(builtin_model_path())
    ModelConfig.from_pretrained(model_path)  # refuse, naming the field, what workers refuse
    tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(cfg.tokenizer or model_path)
    if cfg.chat_template is not None:
        if tokenizer is None:
            raise ConfigError("--chat-template needs a tokenizer (not --skip-tokenizer-init)",
                              "chat_template")
        tokenizer.hf.chat_template = read_chat_template(cfg.chat_template)
    # workers of another model (or tokenizer) are refused, with the reason in /health
    registry = Registry({"prefill": cfg.prefill, "decode": cfg.decode, "both": cfg.worker},
                        token=cfg.internal_token or "",
                        expected=model_identity(model_path, cfg.tokenizer),
                        interval=cfg.health_interval, silence_limit=cfg.data_path_timeout,
                        discover=[parse_discover(e) for e in cfg.discover])
    # vLLM's default name is --model as given; the folder's name is accepted too
    names = cfg.served_model_name or ([BUILTIN_MODEL_NAME] if cfg.model is None else
                                      list(dict.fromkeys([cfg.model, Path(model_path).name])))
    backend = ClusterBackend(registry, tokenizer, names[0],
                             model_path=model_path, min_pd_prompt_tokens=cfg.min_pd_prompt_tokens,
                             placement=cfg.placement,
                             slo=SLO(cfg.slo_ttft_ms / 1e3, cfg.slo_itl_ms / 1e3),
                             max_retries=cfg.max_retries, request_timeout=cfg.request_timeout,
                             max_queued_requests=cfg.max_queued_requests,
                             max_queue_delay=cfg.max_queue_delay,
                             local_workers=supervisor.snapshot if supervisor else None)
    app = create_app(backend, api_keys=cfg.api_key, served_model_name=names,
                     max_body_bytes=cfg.max_body_bytes, access_log=cfg.access_log,
                     tool_call_parser=cfg.tool_call_parser if cfg.enable_auto_tool_choice
                     else None)
    app.add_middleware(CORSMiddleware, allow_origins=json.loads(cfg.allowed_origins),
                       allow_methods=json.loads(cfg.allowed_methods),
                       allow_headers=json.loads(cfg.allowed_headers),
                       allow_credentials=cfg.allow_credentials)

    # outermost (pure ASGI, as every middleware here): every answer counts, by route template
    app.add_middleware(RequestCountMiddleware)

    @app.get("/metrics")
    async def prometheus() -> Response:
        for w in registry.workers:
            metrics.WORKER_HEALTHY.labels(w.url, w.role).set(1.0 if w.usable else 0.0)
            for k, v in w.load.items():
                if isinstance(v, int | float) and k not in ("seq", "time"):
                    metrics.WORKER_LOAD.labels(w.url, w.role, k).set(v)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load() -> JSONResponse:
        return JSONResponse({"server_load": sum(w.active for w in registry.workers),
                             "workers": registry.snapshot()})

    add_membership_routes(app, registry, cfg.internal_token or "",
                          no_token=cfg.insecure_no_token,
                          several_processes=cfg.api_server_count > 1)

    inner = app.router.lifespan_context
    scheme = "https" if cfg.ssl_certfile else "http"
    where = f"{scheme}://{cfg.host}:{cfg.port}/v1 (pid {os.getpid()})"

    async def announce() -> None:
        """One "serving" line once the workers can serve a request (a P/D pair, a D, or a
        both-role worker): until then requests get 503 with the reason in /health."""
        def can_serve() -> bool:  # with P workers configured: a P/D pair
            return registry.ready() and (not cfg.prefill or bool(registry.usable("prefill")))

        while not can_serve():
            await backend.admission.changed(60.0)  # woken by every admission and report
        logger.info("serving the OpenAI API at %s: %s", where, registry.serves())

    async def stats_lines() -> None:
        line = StatsLine(lambda text: logger.info("proxy: %s", text), cfg.stats_interval,
                         backend.totals)
        while True:
            line.tick()
            await asyncio.sleep(cfg.stats_interval / 2)

    @asynccontextmanager
    async def lifespan(a):
        await backend.start()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(announce())]
        if cfg.stats_interval > 0:
            tasks.append(loop.create_task(stats_lines()))
        async with inner(a):
            yield
        for t in tasks:
            t.cancel()
        await backend.close()

    app.router.lifespan_context = lifespan
    return app


def _listen_socket(host: str, port: int, reuse_port: bool, listen: bool = True
                   ) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP;
    # without it every streamed chunk on a kept-alive connection waits ~40 ms (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def reserve_port(cfg: ServeConfig) -> socket.socket:
    """The proxy's port, bound (not yet listening: a client is refused, not left waiting,
    until the proxy serves) before any worker starts; a UserError naming the port and
    --port if it cannot be had."""
    try:
        return _listen_socket(cfg.host, cfg.port, reuse_port=cfg.api_server_count > 1,
                              listen=False)
    except OSError as e:
        why = "in use by another process" if e.errno == errno.EADDRINUSE else e.strerror
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {why} (choose another "
                        "with --port)") from e


def uvicorn_io(cfg: ServeConfig) -> tuple[str, str]:
    """uvicorn's `loop` and `http`: uvloop and httptools unless turned off; asyncio's loop and
    h11 for what cannot be imported, with one warning naming it."""
    import importlib

    missing = []
    for module, wanted in (("uvloop", cfg.uvloop), ("httptools", cfg.httptools)):
        try:
            if wanted:
                importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        logger.warning("%s not importable: the proxy serves with %s instead (slower; install "
                       "%s, or pass %s to choose this)", " and ".join(missing),
                       " and ".join({"uvloop": "asyncio's event loop",
                                     "httptools": "h11"}[m] for m in missing),
                       " ".join(missing), " ".join(f"--no-{m}" for m in missing))
    loop = "uvloop" if cfg.uvloop and "uvloop" not in missing else "asyncio"
    http = "httptools" if cfg.httptools and "httptools" not in missing else "h11"
    return loop, http


def serve_proxy(cfg: ServeConfig, supervisor: Supervisor | None = None,
                sock: socket.socket | None = None) -> None:
    """One proxy process (blocks until SIGTERM/SIGINT; drains streams first); `supervisor`
    (a local cluster's, in its first proxy process) is reported in /health; `sock`: its
    port bound by `reserve_port` (else bound here)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise
    if sock is None:
        sock = _listen_socket(cfg.host, cfg.port, reuse_port=cfg.api_server_count > 1)
    else:
        sock.listen(2048)
    loop, http = uvicorn_io(cfg)
    config = uvicorn.Config(
        build_app(cfg, supervisor), log_level="warning", access_log=False, loop=loop, http=http,
        timeout_keep_alive=int(cfg.keep_alive_timeout),
        timeout_graceful_shutdown=int(cfg.shutdown_timeout),
        ssl_keyfile=cfg.ssl_keyfile, ssl_certfile=cfg.ssl_certfile,
        ssl_ca_certs=cfg.ssl_ca_certs, ssl_cert_reqs=cfg.ssl_cert_reqs)
    scheme = "https" if cfg.ssl_certfile else "http"
    logger.info("listening at %s://%s:%d (pid %d); waiting for the workers' health checks",
                scheme, cfg.host, cfg.port, os.getpid())
    uvicorn.Server(config).run(sockets=[sock])


def run_serve(cfg: ServeConfig) -> int:
    import secrets
    import tempfile

    external = bool(cfg.prefill or cfg.decode or cfg.worker or cfg.elastic or cfg.discover)
    if external:  # workers it did not start: refuse before anything starts
        problem = start_problem(cfg.internal_token, cfg.insecure_no_token,
                                who="the proxy of workers given by URL")
        if problem:
            raise ConfigError(problem, "internal_token")
        if cfg.insecure_no_token:
            logger.warning(insecure_warning("the workers' ports"))
    elif cfg.insecure_no_token:
        logger.warning("%s has no effect on a local cluster: it draws a random token",
                       INSECURE_FLAG)
    if cfg.chat_template is not None:
        read_chat_template(cfg.chat_template)  # a bad value is refused before anything starts
    if cfg.enable_auto_tool_choice and cfg.tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes or "
                          "llama3_json)", "tool_call_parser")
    if not external:
        has_gpu = mps.gpu_present()
        local = _local_roles(cfg)
        gpu_memory_shares(cfg, local, has_gpu)  # likewise
        if problem := local_tp_problem(cfg, local, has_gpu):
            raise ConfigError(problem, "tensor_parallel_size")
    port = reserve_port(cfg)  # before anything starts
    workers: list[Managed] = []
    supervisor = None
    daemon = None
    log_dir: Path | None = None
    clean_exit = False
    # uvicorn re-raises SIGTERM after its own graceful shutdown; as SystemExit it unwinds
    # through the finally below, which stops a local cluster's workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if not external:
        cfg = replace(cfg, internal_token=cfg.internal_token or secrets.token_hex(16),
                      insecure_no_token=False)
        log_dir = Path(tempfile.mkdtemp(prefix="pdserve-cluster-"))
        logger.info("no workers given: starting a local cluster (%d P + %d D); logs in %s",
                    cfg.num_prefill, cfg.num_decode, log_dir)
    try:
        if not external:
            daemon, under_mps = start_mps(cfg, log_dir)
            cfg, workers = start_local_cluster(cfg, log_dir, daemon.env if daemon else
                                               ({} if under_mps else None))
        if workers:
            wait_for_workers(cfg, workers)
            supervisor = Supervisor(workers)  # from now on a dead worker is restarted
            supervisor.start()
        extra = []
        ctx = mp.get_context("spawn")
        for _ in range(cfg.api_server_count - 1):
            p = ctx.Process(target=serve_proxy, args=(cfg,), daemon=True)
            p.start()
            extra.append(p)
        try:
            serve_proxy(cfg, supervisor, port)
        finally:
            for p in extra:
                p.terminate()
                p.join(10)
        clean_exit = True
    except (SystemExit, KeyboardInterrupt):  # SIGTERM (see above) or Ctrl-C: a normal stop
        clean_exit = True
        raise
    finally:
        port.close()
        if supervisor is not None:
            supervisor.stop()
        # SIGINT: at once (the proxy drained its streams first); SIGTERM would have each
        # worker drain what it still holds, for up to its --drain-timeout
        stop_processes([w.proc for w in workers if w.proc is not None], sig=signal.SIGINT)
        if daemon is not None:
            daemon.stop()
        if log_dir is not None:
            if clean_exit:  # the workers' logs go with the cluster
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                logger.info("the local cluster's logs are kept in %s", log_dir)
    return 0


