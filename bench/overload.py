"""Overload control, measured: a local `pdserve serve` cluster (built-in model, 1 P + 1 D)
offered `--factor` times its capacity for `--seconds`. Prints numbers; never asserts.

    python bench/overload.py [--factor 4] [--seconds 30] [--max-queue-delay 2] [--out DIR]

1. one prefill: the median TTFT of single requests on the idle cluster (max_tokens 1);
2. capacity: completed requests/s of `--concurrency` closed-loop streams for `--cap-seconds`;
3. overload: Poisson arrivals at factor x capacity for `--seconds`, every request streamed;
   per request: status, TTFT (first token) for 200s, Retry-After for 429s, end time. A request
   still open `--hang-after` seconds after the last arrival counts as hung. The proxy's
   queue-time and TTFT histograms split the mean TTFT into waiting and service.
The claim checked by eye (issue 13): admitted requests' TTFT p99 < max-queue-delay + one
prefill (shown two ways: a single prompt on the idle cluster, and a full step's worth at
once), every other request a 429 with Retry-After, none hung. JSON per request under --out.
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


async def one(host: str, port: int, prompt: list[int], out_len: int) -> dict:
    """One streamed request on its own connection, read with asyncio streams (httpx's CPU
    cost per request and per chunk made the client, not the proxy, the bottleneck at a few
    hundred requests/s). Status, Retry-After, TTFT (the first chunk with text), end."""
    t0 = time.monotonic()
    rec: dict = {"start": t0, "status": None, "ttft": None, "retry_after": None, "end": None}
    body = json.dumps({"model": "pdserve-builtin-tiny", "prompt": prompt, "max_tokens": out_len,
                       "ignore_eos": True, "stream": True}).encode()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close"
                      "\r\n\r\n").encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        rec["status"] = int(lines[0].split()[1])
        for h in lines[1:]:
            if h.lower().startswith("retry-after:"):
                rec["retry_after"] = h.split(":", 1)[1].strip()
        while data := await reader.read(1 << 16):
            flat = data.replace(b'"text": "', b'"text":"')
            if rec["ttft"] is None and b'"text":"' in flat.replace(b'"text":""', b""):
                rec["ttft"] = time.monotonic() - t0
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        rec["status"] = type(e).__name__
    finally:
        if writer is not None:
            writer.close()
    rec["end"] = time.monotonic() - t0
    return rec


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, 4000) for _ in range(n)]


async def measure(url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    host, port = url.removeprefix("http://").split(":")
    c = (host, int(port))
    idle = [await one(*c, prompt(rng, args.input_len), 1) for _ in range(7)]
    one_prefill = statistics.median(r["ttft"] for r in idle)
    # a full prefill step: as many prompts at once as one step's token budget holds
    burst = []
    for _ in range(5):
        burst += await asyncio.gather(*(one(*c, prompt(rng, args.input_len), 1)
                                        for _ in range(max(1, 2048 // args.input_len))))
    full_step = float(np.percentile([r["ttft"] for r in burst if r["ttft"]], 50))
    stop = time.monotonic() + args.cap_seconds
    done: list[dict] = []

    async def loop():
        while time.monotonic() < stop:
            done.append(await one(*c, prompt(rng, args.input_len), args.output_len))
    await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    ok = [r for r in done if r["status"] == 200]
    if not ok:
        from collections import Counter
        sys.exit(f"no request of the capacity phase succeeded: "
                 f"{Counter(str(r['status']) for r in done)}")
    capacity = len(ok) / (max(r["start"] + r["end"] for r in ok) - min(r["start"] for r in ok))
    rate = args.factor * capacity
    tasks, t = [], time.monotonic()
    end_arrivals = t + args.seconds
    while t < end_arrivals:
        tasks.append(asyncio.create_task(one(*c, prompt(rng, args.input_len),
                                             args.output_len)))
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t - time.monotonic()))
    finished, pending = await asyncio.wait(tasks, timeout=args.hang_after)
    for p in pending:
        p.cancel()
    metrics = httpx.get(url + "/metrics", timeout=30).text
    return {"metrics": metrics, "one_prefill_s": one_prefill, "full_step_s": full_step,
            "capacity_rps": capacity,
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
    ap.add_argument("--no-admission-flags", action="store_true", help="for a build without "
                    "overload control (the before of issue 13): pass neither queue flag")
    ap.add_argument("--serve-arg", action="append", default=[], help="passed to `pdserve serve` "
                    "(repeat; e.g. --serve-arg=--local-devices --serve-arg=0)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="overload-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PDSERVE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(out / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--port", str(port),
                                 "--worker-base-port", str(free_port(6)),
                                 *([] if args.no_admission_flags else [
                                     "--max-queue-delay", str(args.max_queue_delay),
                                     "--max-queued-requests", str(args.max_queued_requests)]),
                                 "--max-num-seqs", str(args.max_num_seqs),
                                 "--log-level", "warning", *args.serve_arg], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                sys.exit(f"pdserve serve exited with code {proc.returncode}:\n"
                         + (out / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        m = asyncio.run(measure(url, args))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
    res = m.pop("results")
    prom = m.pop("metrics")
    (out / "proxy_metrics.txt").write_text(prom)
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
    wait = mean_of(prom, "pdserve_proxy_queue_time_seconds")
    first = mean_of(prom, "pdserve_proxy_time_to_first_token_seconds")
    print(f"whole run, at the proxy: mean queue time {wait * 1e3:.0f} ms, mean TTFT "
          f"{first * 1e3:.0f} ms (so {(first - wait) * 1e3:.0f} ms from admission to first token)")
    if rejected:  # the proxy answers these at the deadline: what the client adds shows here
        late = np.percentile([r["end"] for r in rejected], [50, 99]) * 1e3
        print(f"429s as the client saw them: p50 {late[0]:.0f} ms, p99 {late[1]:.0f} ms after "
              f"sending (the queue deadline is {args.max_queue_delay * 1e3:.0f} ms)")
    step_bound = (args.max_queue_delay + m["full_step_s"]) * 1e3
    print("| admitted | TTFT p50 / p90 / p99 (ms) | max-queue-delay + one prefill: idle / full "
          "step (ms) | 429 (with Retry-After) | other | hung |")
    print(f"| {len(admitted)} | {np.percentile(ttft, 50):.0f} / {np.percentile(ttft, 90):.0f} / "
          f"{np.percentile(ttft, 99):.0f} | {bound:.0f} / {step_bound:.0f} | {len(rejected)} "
          f"({sum(r['retry_after'] is not None for r in rejected)}) | {len(other)} | "
          f"{m['hung']} |")


def mean_of(prom: str, name: str) -> float:
    """A Prometheus histogram's mean from its _sum and _count lines."""
    vals = {}
    for line in prom.splitlines():
        for part in ("_sum", "_count"):
            if line.startswith(name + part + " "):
                vals[part] = float(line.split()[-1])
    if "_sum" not in vals:  # a build without it (the before of issue 13)
        return float("nan")
    return vals["_sum"] / max(1.0, vals["_count"])


if __name__ == "__main__":
    main()
