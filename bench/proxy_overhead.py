"""What one proxy process costs (issue 7): fake engines with known delays behind a real
`pdserve serve`, measured from client processes. Prints numbers; never asserts.

    python bench/proxy_overhead.py [--phases latency,throughput,long] [--profile proxy.prof]

Every phase starts its own fake workers (bench/fake_worker.py, subprocesses) and one real
proxy (`pdserve serve --worker URL` or `--prefill URL --decode URL`,
`--min-pd-prompt-tokens 0` so every request takes the P/D path), then:

1. latency (fakes in exact mode; both-role and P/D): sequential requests. Added latency =
   measured TTFT − `--ttft-ms`, and e2e − (ttft + (n − 1)·itl). Measured twice: by a raw
   keep-alive socket client in this process (TCP_NODELAY, no HTTP library: the proxy's own
   cost plus loopback) and by `pdserve bench` at concurrency 1 (adds httpx's cost); and
   the fake alone, from a ZMQ client (its own timer and socket cost, to subtract).
2. throughput (P/D fakes in `--batch` mode, like a real D): `--streams` concurrent streams
   from `--client-procs` client processes (bench/raw_client.py by default, `--client bench`
   for `pdserve bench`); streamed tokens/s through the one proxy, and tokens per CPU-second
   of the proxy process (what it would do with a core to itself).
3. long (P/D, batch): ITL of `--bg-streams` streams alone, then while `--long-len`-token
   prompts arrive at `--long-rate` req/s from another client process.

Targets (issue 7): <= 1 ms p50 added per request; >= 30,000 tokens/s per proxy process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from raw_client import FakeDirect, RawProbe  # bench/ is this script's folder

HERE = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")
# `--nodelay-fix`: run `pdserve serve` with its listening socket made as IPPROTO_TCP. asyncio
# sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and serve.py's listener has
# proto 0, so Nagle holds each stream's second write until the client's delayed ACK (~40 ms)
# on every keep-alive connection. A stopgap until serve.py creates the socket that way.
_PROXY_MAIN = """import socket, sys
import pdserve.serve as s
if {fix}:
    make = s._listen_socket
    def listen(host, port, reuse_port, **kw):
        sock = make(host, port, reuse_port, **kw)
        if sock.proto == socket.IPPROTO_TCP:
            return sock
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    s._listen_socket = listen
from pdserve.cli import main
if __name__ == "__main__":  # --api-server-count spawns processes that import this file
    sys.exit(main(["serve", *sys.argv[1:]]))
"""


def free_port_block(n: int = 2) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(n)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise RuntimeError("no free port block")


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc): the extra proxy processes."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.exists():
            out += [int(c) for c in children.read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class Cluster:
    """Fake workers + one proxy, as subprocesses; `stop()` ends them by pid."""

    def __init__(self, mode: str, args: argparse.Namespace, batch: bool, log_dir: Path,
                 itl_ms: float | None = None, profile: str | None = None,
                 api_servers: int = 1):
        self.procs: list[subprocess.Popen] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        # the fakes check the proxy's internal token, as real workers do
        self.token = os.environ.get("PDSERVE_INTERNAL_TOKEN") or secrets.token_hex(16)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDSERVE_INTERNAL_TOKEN": self.token}
        fake = [sys.executable, str(HERE / "fake_worker.py"), "--ttft-ms", str(args.ttft_ms),
                "--itl-ms", str(itl_ms or args.itl_ms)] + (["--batch"] if batch else [])
        self.fake_urls = urls = {}
        for role in (("both",) if mode == "both" else ("prefill", "decode")):
            port = free_port_block()
            urls[role] = f"http://127.0.0.1:{port}"
            self._start([*fake, "--role", role, "--port", str(port)], log_dir / f"{role}.log", env)
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        flags = (["--worker", urls["both"]] if mode == "both" else
                 ["--prefill", urls["prefill"], "--decode", urls["decode"]])
        main = log_dir / "proxy_main.py"
        main.write_text(_PROXY_MAIN.format(fix=args.nodelay_fix))
        pre = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
        self.proxy = self._start([*pre, str(main), *flags, "--port", str(self.port),
                                  "--min-pd-prompt-tokens", "0", "--log-level", "warning",
                                  "--api-server-count", str(api_servers)],
                                 log_dir / "proxy.log", env)
        self.fakes = self.procs[:-1]
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"the proxy did not come up; logs in {log_dir}")
            time.sleep(0.2)

    def _start(self, cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):  # SIGINT: the proxy drains and cProfile writes its file
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# ---- clients ------------------------------------------------------------------------------

def bench_procs(url: str, runs: list[list[str]], out_dir: Path, tag: str) -> list[dict]:
    """Run `pdserve bench` processes at once (one per argument list); their JSON runs."""
    procs, paths = [], []
    for i, extra in enumerate(runs):
        path = out_dir / f"{tag}-{i}.json"
        paths.append(path)
        cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", url, "--no-progress",
               "--seed", str(i), "--result-json", str(path), *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            print(f"  a client failed: {err.decode()[-400:]}")
    return [json.loads(path.read_text())["runs"][0] for path in paths if path.exists()]


def raw_procs(url: str, args: argparse.Namespace, per: int) -> list[dict]:
    """bench/raw_client.py stream processes at once; their JSON results."""
    cmd = [sys.executable, str(HERE / "raw_client.py"), "stream", "--url", url, "--conns",
           str(per), "--per-conn", "2", "--input-len", str(args.input_len), "--output-len",
           str(args.stream_output_len)]
    procs = [subprocess.Popen([*cmd, "--seed", str(i)], stdout=subprocess.PIPE)
             for i in range(args.client_procs)]
    return [json.loads(p.communicate()[0]) for p in procs]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---- phases -------------------------------------------------------------------------------

def latency(args: argparse.Namespace, out: Path) -> list[dict]:
    """Per mode: `--latency-runs` runs of `--num-latency` rounds, each round one request
    through the proxy (raw socket) then one straight to the fake engine the proxy uses (a
    ZMQ DEALER: Generate to the both-role fake, Prefill to the P fake), so both paths see
    the same moment of this machine. Added TTFT of a run = p50(proxy) - p50(direct); added
    e2e = p50(proxy e2e) - the ideal (ttft + (n-1) itl) - the fake's own first-token
    overshoot (p50(direct) - ttft). The figures are the medians over runs. Then `pdserve
    bench` at concurrency 1 (httpx's cost on top), once."""
    rows = []
    ideal_e2e = (args.ttft_ms + (args.output_len - 1) * args.itl_ms) / 1e3
    for mode in ("both", "pd"):
        c = Cluster(mode, args, batch=False, log_dir=out / f"lat-{mode}")
        try:
            fake = "both" if mode == "both" else "prefill"
            port = int(c.fake_urls[fake].rsplit(":", 1)[1])
            probe = RawProbe(c.url, args.input_len, args.output_len)
            model = httpx.get(c.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            chat = RawProbe(c.url, args.input_len, args.output_len, chat_model=model)
            direct = FakeDirect(f"tcp://127.0.0.1:{port + 1}", args.output_len, c.token, fake)
            runs = []
            try:
                for _ in range(20):  # warm up both paths
                    probe.one()
                    chat.one()
                    direct.one()
                for _ in range(args.latency_runs):
                    pairs, floor, chats = [], [], []
                    for _ in range(args.num_latency):
                        pairs.append(probe.one())
                        floor.append(direct.one())
                        chats.append(chat.one())
                    fake_over = pct(floor, 50) - args.ttft_ms / 1e3
                    runs.append({
                        "added_ttft_ms": (pct([t for t, _ in pairs], 50) - pct(floor, 50)) * 1e3,
                        "added_e2e_ms": (pct([e for _, e in pairs], 50) - ideal_e2e
                                         - fake_over) * 1e3,
                        "added_chat_ttft_ms": (pct([t for t, _ in chats], 50)
                                               - pct(floor, 50)) * 1e3,
                        "proxy_ttft_p99_ms": pct([t for t, _ in pairs], 99) * 1e3,
                        "direct_ttft_p50_ms": pct(floor, 50) * 1e3,
                        "loadavg": os.getloadavg()})
            finally:
                probe.close()
                chat.close()
                direct.close()
            bench = bench_procs(c.url, [["--concurrency", "1", "--num-prompts",
                                         str(args.num_latency), "--input-len", str(args.input_len),
                                         "--output-len", str(args.output_len)]], out, f"lat-{mode}")
        finally:
            c.stop()
        med = {k: float(np.median([r[k] for r in runs])) for k in (
            "added_ttft_ms", "added_e2e_ms", "added_chat_ttft_ms")}
        rows.append({"mode": mode, "client": "raw socket, interleaved", "n": args.num_latency,
                     "runs": runs, "ttft_p50": med["added_ttft_ms"],
                     "ttft_p99": float(np.median([r["proxy_ttft_p99_ms"] for r in runs]))
                     - runs[0]["direct_ttft_p50_ms"],
                     "e2e_p50": med["added_e2e_ms"], "e2e_p99": float("nan"),
                     "chat_ttft_p50": med["added_chat_ttft_ms"]})
        each = ", ".join(f"{r['added_ttft_ms']:.2f}" for r in runs)
        print(f"latency {mode:<4} raw socket, interleaved with the fake alone: added TTFT p50 "
              f"{med['added_ttft_ms']:.2f} ms, e2e p50 {med['added_e2e_ms']:.2f} ms (median of "
              f"{len(runs)} runs: {each}); a short chat turn (templated and tokenized): "
              f"added TTFT p50 {med['added_chat_ttft_ms']:.2f} ms", flush=True)
        pairs = [(r["ttft_s"], r["e2e_s"]) for r in bench[0]["requests"] if r["ok"]] \
            if bench else []
        ttft = [(t - args.ttft_ms / 1e3) * 1e3 for t, _ in pairs]
        e2e = [(e - ideal_e2e) * 1e3 for _, e in pairs]
        rows.append({"mode": mode, "client": "pdserve bench", "n": len(pairs),
                     "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
                     "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99)})
        r = rows[-1]
        print(f"latency {mode:<4} pdserve bench (vs the configured delays, fake included) "
              f"n={r['n']:<4} TTFT +{r['ttft_p50']:.2f} p99 +{r['ttft_p99']:.2f} ms; e2e "
              f"+{r['e2e_p50']:.2f} p99 +{r['e2e_p99']:.2f} ms", flush=True)
    return rows


def span_tokens(runs: list[dict]) -> tuple[float, int]:
    """Wall span of several client processes' runs and their output tokens."""
    starts, ends, tokens = [], [], 0
    for run in runs:
        for r in run["requests"]:
            if r["ok"]:
                starts.append(run["started_at"] + r["start_s"])
                ends.append(run["started_at"] + r["start_s"] + r["e2e_s"])
                tokens += r["num_output_tokens"]
    return (max(ends) - min(starts) if starts else float("nan")), tokens


def throughput(args: argparse.Namespace, out: Path) -> dict:
    c = Cluster("pd", args, batch=True, log_dir=out / "tput", itl_ms=args.tput_itl_ms,
                profile=args.profile, api_servers=args.api_server_count)
    per = args.streams // args.client_procs
    try:
        bench_procs(c.url, [["--concurrency", "8", "--num-prompts", "16", "--output-len", "16",
                             "--input-len", "64"]], out, "tput-warm")
        proxies = [c.proxy.pid] + child_pids(c.proxy.pid)  # --api-server-count > 1
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in c.procs}
        each0 = {pid: cpu_seconds(pid) for pid in proxies}
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the clients, once reaped
        t0 = time.monotonic()
        if args.client == "raw":
            runs = raw_procs(c.url, args, per)
        else:
            runs = bench_procs(c.url, [["--concurrency", str(per), "--num-prompts", str(2 * per),
                                        "--input-len", str(args.input_len), "--output-len",
                                        str(args.stream_output_len)]] * args.client_procs, out,
                               "tput")
        wall = time.monotonic() - t0
        cpu = {p.pid: cpu_seconds(p.pid) - cpu0[p.pid] for p in c.procs}
        each = {pid: cpu_seconds(pid) - each0[pid] for pid in proxies}
        proxy_cpu = sum(each.values())
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime
    finally:
        c.stop()
    if args.client == "raw":
        span = max(e for r in runs for e in r["ends"]) - min(t for r in runs for t in r["starts"])
        tokens, failed = sum(r["tokens"] for r in runs), sum(r["failed"] for r in runs)
        events = sum(r.get("events", 0) for r in runs)
        itl = (max(r["itl_p50_ms"] for r in runs), max(r["itl_p99_ms"] for r in runs))
    else:
        span, tokens = span_tokens(runs)
        events = 0  # pdserve bench does not count events
        failed = sum(run["summary"]["failed"] for run in runs)
        gaps = [g for run in runs for r in run["requests"] for g in r["itl_s"]]
        itl = (pct(gaps, 50) * 1e3, pct(gaps, 99) * 1e3)
    fake_cpu = sum(cpu[p.pid] for p in c.fakes)
    res = {"streams": args.streams, "client_procs": args.client_procs, "tokens": tokens,
           "api_server_count": args.api_server_count,
           "failed": failed, "span_s": span, "tokens_per_s": tokens / span,
           "proxy_cpu_s": proxy_cpu, "proxy_cpu_util": proxy_cpu / wall,
           "proxy_cpu_s_each": sorted(each.values(), reverse=True),
           "tokens_per_proxy_cpu_s": tokens / proxy_cpu, "fakes_cpu_s": fake_cpu,
           "clients_cpu_s": client_cpu, "wall_s": wall,
           "offered_tokens_per_s": args.streams * 1e3 / args.tput_itl_ms,
           "client": args.client, "itl_p50_ms": itl[0], "itl_p99_ms": itl[1],
           "tokens_per_sse_event": tokens / events if events else float("nan")}
    print(f"throughput: {tokens} tokens in {span:.2f} s = {res['tokens_per_s']:.0f} tokens/s "
          f"through {args.api_server_count} proxy process(es) ({args.streams} streams from "
          f"{args.client_procs} {args.client} "
          f"client processes, {failed} failed; offered "
          f"{res['offered_tokens_per_s']:.0f}); proxy CPU {proxy_cpu:.1f} s "
          f"({100 * res['proxy_cpu_util']:.0f}% of a core; per process "
          f"{', '.join(f'{x:.1f}' for x in res['proxy_cpu_s_each'])} s) = "
          f"{res['tokens_per_proxy_cpu_s']:.0f} "
          f"tokens per proxy CPU-second; fakes {fake_cpu:.1f} CPU-s; clients {client_cpu:.1f} "
          f"CPU-s (wall {wall:.1f} s, {os.cpu_count()} CPUs); ITL p50 "
          f"{res['itl_p50_ms']:.1f} p99 {res['itl_p99_ms']:.1f} ms; "
          f"{res['tokens_per_sse_event']:.2f} tokens per SSE event", flush=True)
    return res


def long_prompts(args: argparse.Namespace, out: Path) -> dict:
    c = Cluster("pd", args, batch=True, log_dir=out / "long")
    bg = ["--concurrency", str(args.bg_streams), "--num-prompts", str(args.bg_streams),
          "--input-len", str(args.input_len), "--output-len", str(args.bg_output_len)]
    longs = ["--request-rate", str(args.long_rate), "--num-prompts", str(args.num_long),
             "--input-len", str(args.long_len), "--output-len", "4"]
    try:
        alone = bench_procs(c.url, [bg], out, "long-alone")
        mixed = bench_procs(c.url, [bg, longs], out, "long-mixed")
    finally:
        c.stop()
    res: dict[str, Any] = {"long_len": args.long_len, "long_rate": args.long_rate}
    for name, runs in (("alone", alone), ("with_long", mixed[:1])):
        gaps = [g * 1e3 for r in runs[0]["requests"] for g in r["itl_s"]]
        res[name] = {"itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99), "itl_max": max(gaps)}
    if len(mixed) > 1:
        s = mixed[1]["summary"]
        res["long_ttft_p50_ms"] = (s["ttft"]["p50"] or float("nan")) * 1e3
        res["long_failed"] = s["failed"]
    print(f"long prompts: ITL of {args.bg_streams} streams (itl {args.itl_ms} ms) alone p50 "
          f"{res['alone']['itl_p50']:.1f} p99 {res['alone']['itl_p99']:.1f} ms; with "
          f"{args.long_len}-token prompts at {args.long_rate}/s: p50 "
          f"{res['with_long']['itl_p50']:.1f} p99 {res['with_long']['itl_p99']:.1f} max "
          f"{res['with_long']['itl_max']:.1f} ms; long prompts' TTFT p50 "
          f"{res.get('long_ttft_p50_ms', float('nan')):.1f} ms", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="latency,throughput,long")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=8, help="latency phase")
    p.add_argument("--num-latency", type=int, default=100)
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--client", choices=("raw", "bench"), default="raw",
                   help="throughput clients: bench/raw_client.py or pdserve bench (httpx)")
    p.add_argument("--tput-itl-ms", type=float, default=5.0, help="throughput phase's step")
    p.add_argument("--stream-output-len", type=int, default=256)
    p.add_argument("--bg-streams", type=int, default=32)
    p.add_argument("--bg-output-len", type=int, default=400)
    p.add_argument("--long-len", type=int, default=8192)
    p.add_argument("--long-rate", type=float, default=4.0)
    p.add_argument("--num-long", type=int, default=12)
    p.add_argument("--api-server-count", type=int, default=1, help="proxy processes on the "
                   "port in the throughput phase (their CPU is summed); needs free cores")
    p.add_argument("--profile", default=None, help="cProfile the throughput phase's proxy")
    p.add_argument("--nodelay-fix", action="store_true", help="stopgap: TCP_NODELAY on the "
                   "proxy's connections (see _PROXY_MAIN)")
    p.add_argument("--out", default=None, help="folder for logs and JSON (default: a temp one)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="proxy-overhead-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; logs and JSON in {out}; nodelay fix: "
          f"{args.nodelay_fix}; load average {os.getloadavg()}", flush=True)
    results: dict[str, Any] = {"loadavg_start": os.getloadavg()}
    phases = args.phases.split(",")
    if "latency" in phases:
        results["latency"] = latency(args, out)
    if "throughput" in phases:
        results["throughput"] = throughput(args, out)
    if "long" in phases:
        results["long"] = long_prompts(args, out)
    results["loadavg_end"] = os.getloadavg()
    # fixed keys, so runs compare (issue 17): raw-socket client rows, per path
    lat = {r["mode"]: r for r in results.get("latency", [])
           if r["client"] == "raw socket, interleaved"}
    tput = results.get("throughput", {})
    results["summary"] = {
        "added_ttft_p50_ms": {m: lat[m]["ttft_p50"] for m in ("both", "pd") if m in lat},
        "added_e2e_p50_ms": {m: lat[m]["e2e_p50"] for m in ("both", "pd") if m in lat},
        "added_chat_ttft_p50_ms": {m: lat[m]["chat_ttft_p50"] for m in ("both", "pd")
                                   if m in lat},
        "tokens_per_s": tput.get("tokens_per_s"),
        "tokens_per_proxy_cpu_s": tput.get("tokens_per_proxy_cpu_s"),
        "tokens_per_sse_event": tput.get("tokens_per_sse_event"),
        "loadavg_start": results["loadavg_start"], "loadavg_end": results["loadavg_end"]}
    print("summary:", json.dumps(results["summary"]))
    print(f"load average (1, 5, 15 min) at the end: {results['loadavg_end']}")
    (out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
