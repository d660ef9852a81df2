"""Supervision of a local cluster's workers (`pdserve serve` with no worker URLs).

Once the cluster was first ready, a thread watches every worker process: one that exits
(crash, kill -9, an engine that died) is restarted on its own ports with the same command,
after a backoff that doubles per recent crash (0.5 s, 1 s, 2 s ... at most 10 s). A worker
that crashed MAX_CRASHES times within WINDOW_S is given up on: the proxy serves without it
(its health checks fail; /health lists what the cluster can still serve, and this
supervisor's record of every worker). Each restart is logged with the end of the dead
worker's log, counted (`pdserve_proxy_worker_restarts_total`), and followed by a sweep of
dead workers' /dev/shm pool files. The proxy readmits a restarted worker by itself: its
data-path link reconnects and the worker answers pings again.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from pdserve.common.shm_files import sweep_stale

logger = logging.getLogger("pdserve.supervisor")

MAX_CRASHES = 5
WINDOW_S = 60.0
BACKOFF_S = (0.5, 10.0)  # first delay, cap


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])


@dataclass(eq=False)
class Managed:
    """One local worker: how to start it, and its history."""

    role: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    state: str = "starting"  # running | restarting | gave up | stopped
    restarts: int = 0
    crashes: collections.deque = field(default_factory=collections.deque)  # monotonic times
    next_start: float = 0.0
    last_exit: int | None = None
    echo: TextIO | None = None  # also copy the output here, each line prefixed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def prefix(self) -> str:
        return f"{self.role}-{self.port} | "

    def start(self) -> None:
        if self.echo is None:
            with open(self.log_path, "a") as log:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env)
        else:  # a thread tees the output to the log file and, prefixed, to `echo`
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=self.env)
            self._teeing = threading.Thread(target=self._tee, args=(self.proc.stdout,),
                                            daemon=True, name=f"tee-{self.role}-{self.port}")
            self._teeing.start()
        self.state = "running"

    def log_end(self, lines: int = 15) -> str:
        """The end of its log, once a dead worker's last output is in the file."""
        teeing = getattr(self, "_teeing", None)
        if teeing is not None and self.proc is not None and self.proc.poll() is not None:
            teeing.join(5)
        return log_tail(self.log_path, lines)

    def _tee(self, out: IO[bytes]) -> None:
        """Until the worker's output ends: every line to its log file and to `echo` (a
        console gone is no reason to stop: the worker would block on a full pipe)."""
        with open(self.log_path, "ab") as log, out:
            for line in out:
                log.write(line)
                log.flush()
                try:
                    self.echo.write(self.prefix + line.decode(errors="replace"))
                    self.echo.flush()
                except (OSError, ValueError):
                    pass

    def snapshot(self) -> dict[str, Any]:
        return {"role": self.role, "url": self.url, "state": self.state,
                "pid": self.proc.pid if self.proc is not None else None,
                "restarts": self.restarts, "last_exit_code": self.last_exit,
                "log": str(self.log_path)}


class Supervisor:
    """Restarts dead workers (see the module doc). `start()` once the cluster is ready;
    `stop()` before stopping the workers themselves."""

    def __init__(self, workers: list[Managed], interval: float = 0.2):
        self.workers = workers
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            for w in self.workers:
                if w.state != "gave up":
                    w.state = "stopped"

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [w.snapshot() for w in self.workers]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    for w in self.workers:
                        self.check(w, time.monotonic())
            except Exception:  # noqa: BLE001 - supervision must go on
                logger.exception("supervisor round failed")

    def check(self, w: Managed, now: float) -> None:
        """One look at `w`: note a death, restart it when its backoff has passed."""
        if w.state == "running" and w.proc is not None and w.proc.poll() is not None:
            w.last_exit = w.proc.returncode
            w.crashes.append(now)
            while w.crashes and now - w.crashes[0] > WINDOW_S:
                w.crashes.popleft()
            sweep_stale()
            if len(w.crashes) >= MAX_CRASHES:
                w.state = "gave up"
                logger.error("local %s worker on port %d exited (code %s), its %d-th crash in "
                             "%.0f s: not restarting it; the cluster serves without it. The "
                             "end of its log %s:\n%s", w.role, w.port, w.last_exit,
                             len(w.crashes), WINDOW_S, w.log_path, w.log_end())
                return
            delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (len(w.crashes) - 1))
            w.state, w.next_start = "restarting", now + delay
            logger.warning("local %s worker on port %d exited (code %s); restarting it in "
                           "%.1f s. The end of its log %s:\n%s", w.role, w.port, w.last_exit,
                           delay, w.log_path, w.log_end())
        elif w.state == "restarting" and now >= w.next_start:
            from pdserve.proxy import metrics

            w.start()
            w.restarts += 1
            metrics.WORKER_RESTARTS.labels(w.url, w.role).inc()
            logger.info("restarted the local %s worker on port %d (pid %d, restart %d)",
                        w.role, w.port, w.proc.pid, w.restarts)
