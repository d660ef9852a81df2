"""CUDA MPS for a local cluster whose workers share a GPU (`pdserve serve --mps`).

Without MPS, the CUDA contexts of two processes on one GPU take turns in time slices: while D
has a decode step in flight, P's prefill kernels wait for their slice, and a 4,000-token
prefill beside a decoding stream took 181 ms instead of 107 ms on an H200 (BENCHMARKS.md,
issue 15). Under an MPS daemon the kernels of both share the SMs at once. So a local cluster
with two or more workers on one GPU starts a private MPS control daemon of its own: its pipe
and log folders live in the cluster's log folder (CUDA_MPS_PIPE_DIRECTORY /
CUDA_MPS_LOG_DIRECTORY, passed to the workers only), nothing system-wide is touched, and it
is told to quit when the cluster stops. An MPS daemon the environment already names
(CUDA_MPS_PIPE_DIRECTORY) or the system one (/tmp/nvidia-mps) is used as it is.

The price: under MPS, a fatal GPU fault in one client (an illegal address in a kernel) ends
every client of that GPU, so one crashing worker takes its GPU neighbours with it (the
supervisor restarts them all). `--mps off` keeps time slicing.

This module is torch-free: the proxy decides from the configured device strings.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("pdserve.mps")

CONTROL = "nvidia-cuda-mps-control"
SYSTEM_PIPE_DIR = Path("/tmp/nvidia-mps")  # the daemon's default pipe folder


class MpsError(RuntimeError):
    """The MPS daemon did not start (the message says why)."""


def gpu_present(env: dict[str, str] | None = None) -> bool:
    """Whether this host shows an NVIDIA GPU to its processes (no CUDA import)."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def gpu_index(device: str, has_gpu: bool) -> int | None:
    """The GPU a worker's `--device` puts it on (None: the CPU)."""
    if device == "cpu" or not has_gpu:
        return None
    if device in ("auto", "cuda"):
        return 0
    if device.isdigit():
        return int(device)
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None


def shared_gpus(devices: list[str], has_gpu: bool) -> list[int]:
    """GPUs that two or more of the workers (one device string each) would share."""
    count: dict[int, int] = {}
    for d in devices:
        i = gpu_index(d, has_gpu)
        if i is not None:
            count[i] = count.get(i, 0) + 1
    return sorted(i for i, n in count.items() if n > 1)


@dataclass
class Plan:
    start: bool  # start a private daemon
    reason: str  # one line for the log
    under: bool = False  # the workers run under a daemon already there
    warn: bool = False  # the reason is a warning (GPU sharing in time slices)


def plan(mode: str, devices: list[str], env: dict[str, str] | None = None,
         has_gpu: bool | None = None, control: str | None = None) -> Plan:
    """What `--mps MODE` means for workers on `devices`. Raises MpsError for `--mps on`
    where it cannot be done."""
    env = os.environ if env is None else env
    has_gpu = gpu_present(env) if has_gpu is None else has_gpu
    control = shutil.which(CONTROL, path=env.get("PATH")) if control is None else control
    if mode == "off":
        return Plan(False, "MPS off (--mps off): workers sharing a GPU take turns in time "
                           "slices")
    if env.get("CUDA_MPS_PIPE_DIRECTORY"):
        return Plan(False, "workers use the MPS daemon of CUDA_MPS_PIPE_DIRECTORY="
                           f"{env['CUDA_MPS_PIPE_DIRECTORY']}", under=True)
    if (SYSTEM_PIPE_DIR / "control").exists():
        return Plan(False, f"workers use the system's MPS daemon ({SYSTEM_PIPE_DIR})",
                    under=True)
    shared = shared_gpus(devices, has_gpu)
    if mode == "on":
        if not has_gpu:
            raise MpsError("--mps on: this host shows no NVIDIA GPU")
        if not control:
            raise MpsError(f"--mps on: {CONTROL} is not on PATH (it ships with the NVIDIA "
                           "driver's compute utilities)")
        return Plan(True, "MPS on (--mps on)")
    if not shared:
        return Plan(False, "no two local workers share a GPU: no MPS")
    gpus = ", ".join(map(str, shared))
    if not control:
        return Plan(False, f"local workers share GPU {gpus} without MPS ({CONTROL} is not on "
                           "PATH): their kernels take turns in time slices, and a prefill "
                           "beside a decode step runs at about half speed", warn=True)
    return Plan(True, f"local workers share GPU {gpus}: starting a private MPS daemon (--mps "
                      "off: time slicing)")


class Daemon:
    """A private MPS control daemon under `root` (its pipe and log folders)."""

    def __init__(self, root: Path, control: str | None = None):
        self.pipe_dir = root / "mps-pipe"
        self.log_dir = root / "mps-log"
        self.control = control or shutil.which(CONTROL) or CONTROL
        self.running = False

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
                "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.control, *args], input=stdin, capture_output=True,
                              text=True, timeout=30, env={**os.environ, **self.env})

    def start(self) -> None:
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            r = self._run(["-d"])
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MpsError(f"{self.control} -d: {e}") from e
        if r.returncode != 0:
            log = self.log_dir / "control.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise MpsError(f"{self.control} -d exited with code {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()}{chr(10) + tail if tail else ''}")
        self.running = True
        logger.info("MPS control daemon started (pipe %s, log %s)", self.pipe_dir, self.log_dir)

    def stop(self) -> None:
        """Ask the daemon to quit (it ends its server once the clients are gone)."""
        if not self.running:
            return
        self.running = False
        try:
            r = self._run([], stdin="quit\n")
            if r.returncode != 0:
                logger.warning("MPS daemon quit: exit code %d: %s", r.returncode,
                               (r.stderr or r.stdout).strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("MPS daemon quit failed: %s", e)
