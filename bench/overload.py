"""Overload control, measured: a local `pdserve serve` cluster (built-in model, 1 P + 1 D)
offered `--factor` times its capacity for `--seconds`. Prints numbers; never asserts.

    python bench/overload.py [--factor 4] [--seconds 30] [--max-queue-delay 2] [--out DIR]

1. one prefill: the median TTFT of single requests on the idle cluster (max_tokens 1);
2. capacity: completed requests/s of `--concurrency` closed-loop streams for `--cap-seconds`;
3. overload: Poisson arrivals at factor x capacity for `--seconds`, every request streamed;
   per request: status, TTFT (first token) for 200s, Retry-After for 429s, end time. A request
   still open `--hang-after` seconds after the last arrival counts as hung.
The claim checked by eye (issue 13): admitted requests' TTFT p99 < max-queue-delay + one
prefill, every other request a 429 with Retry-After, none hung. JSON per request under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def free_port(n: int = 1) -> int:
    """A base port p with p .. p+n-1 free a moment ago."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        socks = []
        try:
            for i in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()


async def one(c: httpx.AsyncClient, url: str, prompt: list[int], out_len: int) -> dict:
    t0 = time.monotonic()
    rec: dict = {"start": t0, "status": None, "ttft": None, "retry_after": None, "end": None}
    body = {"model": "pdserve-builtin-tiny", "prompt": prompt, "max_tokens": out_len,
            "ignore_eos": True, "stream": True}
    try:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            rec["retry_after"] = r.headers.get("retry-after")
            async for line in r.aiter_lines():
                if rec["ttft"] is None and line.startswith("data: {") and '"text"' in line:
                    rec["ttft"] = time.monotonic() - t0
    except httpx.HTTPError as e:
        rec["status"] = f"{type(e).__name__}"
    rec["end"] = time.monotonic() - t0
    return rec


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, 4000) for _ in range(n)]


async def measure(url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=None, limits=limits) as c:
        idle = [await one(c, url, prompt(rng, args.input_len), 1) for _ in range(7)]
        one_prefill = statistics.median(r["ttft"] for r in idle)
        # a full prefill step: as many prompts at once as one step's token budget holds
        burst = []
        for _ in range(5):
            burst += await asyncio.gather(*(one(c, url, prompt(rng, args.input_len), 1)
                                            for _ in range(max(1, 2048 // args.input_len))))
        full_step = float(np.percentile([r["ttft"] for r in burst if r["ttft"]], 50))
        stop = time.monotonic() + args.cap_seconds
        done: list[dict] = []

        async def loop():
            while time.monotonic() < stop:
                done.append(await one(c, url, prompt(rng, args.input_len), args.output_len))
        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
        ok = [r for r in done if r["status"] == 200]
        capacity = len(ok) / (max(r["start"] + r["end"] for r in ok) - min(r["start"] for r in ok))
        rate = args.factor * capacity
        tasks, t = [], time.monotonic()
        end_arrivals = t + args.seconds
        while t < end_arrivals:
            tasks.append(asyncio.create_task(one(c, url, prompt(rng, args.input_len),
                                                 args.output_len)))
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t - time.monotonic()))
        finished, pending = await asyncio.wait(tasks, timeout=args.hang_after)
        for p in pending:
            p.cancel()
        return {"one_prefill_s": one_prefill, "full_step_s": full_step, "capacity_rps": capacity,
                "offered_rps": rate, "results": [f.result() for f in finished],
                "hung": len(pending)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cap-seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-queue-delay", type=float, default=2.0)
    ap.add_argument("--max-queued-requests", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="the workers' (a CPU D at "
                    "256 sequences steps for most of a second)")
    ap.add_argument("--hang-after", type=float, default=120.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="overload-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PDSERVE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(out / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--port", str(port),
                                 "--worker-base-port", str(free_port(6)),
                                 "--max-queue-delay", str(args.max_queue_delay),
                                 "--max-queued-requests", str(args.max_queued_requests),
                                 "--max-num-seqs", str(args.max_num_seqs),
                                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        m = asyncio.run(measure(url, args))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    res = m.pop("results")
    (out / "overload.json").write_text(json.dumps({**m, "args": vars(args), "requests": res}))
    admitted = [r for r in res if r["status"] == 200]
    rejected = [r for r in res if r["status"] == 429]
    other = [r for r in res if r["status"] not in (200, 429)]
    ttft = np.asarray([r["ttft"] for r in admitted if r["ttft"] is not None]) * 1e3
    bound = (args.max_queue_delay + m["one_prefill_s"]) * 1e3
    print(f"machine: {os.cpu_count()} CPUs; logs and JSON in {out}")
    print(f"one prefill (idle TTFT, {args.input_len} tokens): {m['one_prefill_s'] * 1e3:.1f} ms, "
          f"a full step's ({2048 // args.input_len} at once): {m['full_step_s'] * 1e3:.1f} ms; "
          f"capacity {m['capacity_rps']:.2f} req/s ({args.concurrency} closed-loop streams, "
          f"{args.input_len} in / {args.output_len} out)")
    print(f"offered {m['offered_rps']:.2f} req/s ({args.factor:g}x) for {args.seconds:g} s: "
          f"{len(res) + m['hung']} requests")
    print("| admitted | TTFT p50 / p99 (ms) | bound: max-queue-delay + one prefill (ms) | 429 "
          "(with Retry-After) | other | hung |")
    print(f"| {len(admitted)} | {np.percentile(ttft, 50):.0f} / {np.percentile(ttft, 99):.0f} | "
          f"{bound:.0f} | {len(rejected)} ({sum(r['retry_after'] is not None for r in rejected)})"
          f" | {len(other)} | {m['hung']} |")


if __name__ == "__main__":
    main()
