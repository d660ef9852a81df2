"""Proxy start-up: seconds from launching `pdserve serve --prefill URL --decode URL` (nothing
listens at those URLs) to its first /health answer (a 503 naming the reason is fine),
over N launches; prints each launch and the median. Measures; asserts nothing.

    .venv/bin/python bench/proxy_startup.py [--launches 5] [--pdserve .venv/bin/pdserve]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_launch(pdserve: str) -> tuple[float, int]:
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([pdserve, "serve", "--prefill", "http://127.0.0.1:9", "--decode",
                             "http://127.0.0.1:10", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PDSERVE_INTERNAL_TOKEN": secrets.token_hex(16)})
    try:
        while time.monotonic() - t0 < 120:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
                return time.monotonic() - t0, status
            except httpx.HTTPError:
                time.sleep(0.01)
        raise TimeoutError("no /health answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--pdserve", default=".venv/bin/pdserve")
    args = ap.parse_args()
    times = []
    for i in range(args.launches):
        secs, status = one_launch(args.pdserve)
        times.append(secs)
        print(f"launch {i}: /health {status} after {secs:.2f} s", flush=True)
    print(f"median of {len(times)}: {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
