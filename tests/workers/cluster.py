"""Real worker processes for tests: `pdserve prefill|decode|worker` as subprocesses on free
loopback ports, with bounded threads, killed (and their shm files checked) at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

_HANDED_OUT: set[int] = set()  # ports this process's free_port_block returned


def free_port_block(n: int = 3) -> int:
    """A base port p such that p, p+1 .. p+n-1 were all free a moment ago and none of them
    was handed out before by this process: workers started one after another bind their
    ports only once running, so a block picked for the next worker must not overlap one
    picked for the last (a CI run's decode worker once got its prefill worker's third port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        block = range(base, base + n)
        if base + n >= 65535 or _HANDED_OUT.intersection(block):
            continue
        try:
            socks = []
            for i in range(n):
                t = socket.socket()
                t.bind(("127.0.0.1", base + i))
                socks.append(t)
            for t in socks:
                t.close()
            _HANDED_OUT.update(block)
            return base
        except OSError:
            for t in socks:
                t.close()
    raise RuntimeError("no free port block")


@dataclass
class Worker:
    role: str
    port: int
    proc: subprocess.Popen
    log: Path
    token: str

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> str:
        return f"tcp://127.0.0.1:{self.port + 1}"

    def get(self, path: str, **kw) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kw.pop("headers", {}))
        return httpx.get(self.http + path, headers=headers, timeout=10, **kw)

    def load(self) -> dict:
        return self.get("/load").json()

    def stop(self) -> None:
        stop_workers([self])

    def interrupt(self) -> None:
        """SIGINT: stop at once (SIGTERM drains, up to 25 s); `wait_stopped` waits for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait_stopped(self) -> None:
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def stop_workers(workers) -> None:
    """Stop workers together: each gets its SIGINT before any is waited for (a worker takes
    about a second to exit; a module's seven, one after another, took seven)."""
    workers = list(workers)
    for w in workers:
        w.interrupt()
    for w in workers:
        w.wait_stopped()


# a random-looking internal token: workers refuse placeholders such as "secret"
TOKEN = "t-5f1c9e7a2b4d8063"


def start_worker(role: str, tmp: Path, *args: str, token: str = TOKEN,
                 env: dict | None = None) -> Worker:
    port = free_port_block()
    log = tmp / f"{role}-{port}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PDSERVE_TORCH_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "pdserve", "worker", "--role", role, "--port", str(port),
           "--internal-token", token, "--num-gpu-blocks-override", "400",
           "--max-model-len", "512", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
    return Worker(role, port, proc, log, token)


def wait_healthy(workers: list[Worker], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        w = pending[0]
        if w.proc.poll() is not None:
            raise RuntimeError(f"{w.role} worker exited:\n{w.log.read_text()[-3000:]}")
        try:
            if w.get("/health").status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{w.role} worker not healthy:\n{w.log.read_text()[-3000:]}")
        time.sleep(0.2)
