"""The P -> D handoff's cost, seen by a client through `pdserve serve`: real processes, real
sockets. Prints numbers; never asserts.

    python bench/handoff.py --mode cpu-fake    [--num-requests 200] [--runs 3] [--out F.json]
    python bench/handoff.py --mode cpu-builtin [...]
    python bench/handoff.py --mode cpu         # both CPU modes, one after the other
    python bench/handoff.py --mode gpu         # on a GPU host: bash bench/gpu_handoff.sh

What is measured, per streamed request (/v1/completions, a token-id prompt, `max_tokens` N,
`ignore_eos`, `return_token_ids` so every SSE event names the tokens it carries): the arrival
time (time.perf_counter, on a lean asyncio socket client with TCP_NODELAY, one connection per
request) of every event; token k's time is that of the event that carried it (an event may
carry 0 tokens, e.g. a finish-only one, or several). Then:

- TTFT: request sent -> token 1;  token-2 gap: token 1 -> token 2;
- ITL: the median of the gaps token k-1 -> token k for k = 3 .. N (all on D);
- excess = token-2 gap - ITL: what the handoff adds (P's first token travels to the client
  while the KV moves to D and D joins the request to its batch; on a both-role worker token
  2 is just the next step). Reported as p50 / p90 over requests, with p50 of TTFT, token-2 gap
  and ITL; each run separately and the median of the per-run figures.

Workload: seed 0 (arrival times the same in every run; fresh random prompt ids per run and
per request, so no prefix-cache hit sends a request past P), `--warmup` (2) requests first,
not counted, then `--runs` (3) runs of `--num-requests` (200) after the cluster is ready:
the proxy's GET /health is 200 and says it serves prefill/decode (or both-role workers).

Modes (each one cluster, started here and stopped at the end, `--min-pd-prompt-tokens 0`):
- cpu-fake: bench/fake_worker.py as a prefill and a decode process (`--ttft-ms 0
  --itl-ms {--fake-itl-ms}`: no compute, the KV "moves" at once) behind `pdserve serve
  --prefill URL --decode URL`. The fakes run in their exact timing mode: D sends token 2 one
  ITL after the proxy's Join and every later token one ITL after the previous one, so a
  zero-cost handoff gives a token-2 gap of exactly one ITL and the excess is what the proxy
  and the sockets add to the handoff (P's First in, Join out to D; `--batch` mode would add a
  wait for the next tick of D's global step clock, U(0, ITL), whenever other streams run).
  Sequential requests, ~300-token prompts, 24 output tokens.
- cpu-builtin: `pdserve serve --num-prefill 1 --num-decode 1` (a local cluster of the
  built-in tiny model, workers at `--torch-threads 1`, OMP_NUM_THREADS=1). Same workload.
- gpu-pd and gpu-both (`--mode gpu` = both, one after the other on GPU 0): Llama-3-8B shapes
  (bench/serving_gpu.py's LLAMA3_8B) with dummy bf16 weights, token-ids-only serving;
  gpu-pd is a local 1 P + 1 D on the same GPU (`--local-devices 0 0`, KV over cuda_ipc;
  `pdserve serve` starts a private MPS daemon for them: --mps auto), gpu-pd-timeslice the
  same with `--mps off` (the two processes take turns on the GPU in time slices),
  gpu-both one `pdserve worker --role both` behind `pdserve serve --worker URL`; each with
  `--gpu-kv-bytes` of KV. 4,000-token prompts, 64 output tokens, Poisson 2 req/s. `--gpu 0,1`:
  P on GPU 0 and D on GPU 1 (KV over cuda_ipc across GPUs) vs two both-role workers, one per
  GPU, serving whole requests (the proxy's default --placement threshold).
`--rate`, `--prompt-len`, `--output-len` override the mode's workload (rate 0: sequential).

Also per mode: launch -> ready seconds ("ready_s"; cold-start numbers on GPU), the TTFT of
each run's first request ("first_ttft_ms") and of the warm-up requests; the histograms of
every worker's and the proxy's /metrics whose names contain `handoff` (e.g.
pdserve_kv_handoff_seconds{stage}), `kv_transfer_seconds` and the proxy's token-2 latency,
as {labels: {count, sum, mean}} over the measured runs (none if a build lacks them), and the
proxy's routing/transfer counters; then, with the cluster idle, each process's CPU use over
`--idle-seconds` (utime + stime of it and all its descendants, worker subtrees apart; 100 =
one core): "idle_cpu_percent". Every subprocess logs to its own file under a temporary
folder (printed) and is stopped at exit, also on errors and Ctrl-C. `--out` JSON is rewritten
after every run; the table prints last.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from overload import free_port  # bench/ is this script's folder

HERE = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")
HISTOGRAMS = re.compile(r"handoff|^kv_transfer_seconds$|token2")
COUNTERS = ("pdserve_proxy_routing_decisions_total", "pdserve_proxy_transfer_failures_total",
            "pdserve_proxy_retries_total", "pdserve_proxy_failovers_total",
            "kv_transfer_fallback_total")

# the workload of each mode: prompt tokens, output tokens, request rate (0: sequential),
# largest prompt token id (exclusive)
WORKLOADS = {
    "cpu-fake": dict(prompt_len=300, output_len=24, rate=0.0, vocab_high=4000),
    "cpu-builtin": dict(prompt_len=300, output_len=24, rate=0.0, vocab_high=4000),
    "gpu-pd": dict(prompt_len=4000, output_len=64, rate=2.0, vocab_high=128000),
    "gpu-both": dict(prompt_len=4000, output_len=64, rate=2.0, vocab_high=128000),
    "gpu-pd-timeslice": dict(prompt_len=4000, output_len=64, rate=2.0, vocab_high=128000),
}
GROUPS = {"cpu": ["cpu-fake", "cpu-builtin"], "gpu": ["gpu-pd", "gpu-both"],
          "gpu-all": ["gpu-pd", "gpu-both", "gpu-pd-timeslice"]}


# ---- the numbers --------------------------------------------------------------------------

def token_times(events: list[tuple[float, int]]) -> list[float]:
    """Each token's time, from (event arrival time, tokens the event carried) in order."""
    return [t for t, n in events for _ in range(n)]


def handoff_numbers(times: list[float], sent: float = 0.0) -> dict[str, float]:
    """TTFT, token-2 gap, ITL (median gap of tokens 3..N to their predecessors) and excess
    (token-2 gap - ITL), in ms, from the tokens' times (s); NaN where there are too few."""
    nan = float("nan")
    ttft = (times[0] - sent) * 1e3 if times else nan
    gap2 = (times[1] - times[0]) * 1e3 if len(times) >= 2 else nan
    later = [(b - a) * 1e3 for a, b in zip(times[1:], times[2:])]
    itl = statistics.median(later) if later else nan
    return {"ttft_ms": ttft, "token2_gap_ms": gap2, "itl_ms": itl, "excess_ms": gap2 - itl}


def pct(values: list[float], q: float) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.percentile(vals, q)) if vals else None


def summarize(reqs: list[dict]) -> dict[str, Any]:
    ok = [r for r in reqs if r.get("error") is None]
    col = {k: [r[k] for r in ok] for k in ("ttft_ms", "token2_gap_ms", "itl_ms", "excess_ms")}
    return {"ok": len(ok), "failed": len(reqs) - len(ok),
            "ttft_ms_p50": pct(col["ttft_ms"], 50), "ttft_ms_p90": pct(col["ttft_ms"], 90),
            "token2_gap_ms_p50": pct(col["token2_gap_ms"], 50),
            "token2_gap_ms_p90": pct(col["token2_gap_ms"], 90),
            "itl_ms_p50": pct(col["itl_ms"], 50),
            "excess_ms_p50": pct(col["excess_ms"], 50), "excess_ms_p90": pct(col["excess_ms"], 90),
            "excess_ms_p99": pct(col["excess_ms"], 99),
            "excess_ms_mean": (statistics.fmean(x) if (x := [v for v in col["excess_ms"]
                                                             if math.isfinite(v)]) else None),
            "zero_token_events": sum(r["zero_token_events"] for r in ok),
            "multi_token_events": sum(r["multi_token_events"] for r in ok),
            "held_text_events": sum(r["held_text_events"] for r in ok),
            "wrong_token_count": sum(r["num_tokens"] != r["max_tokens"] for r in ok)}


def median_of_runs(runs: list[dict]) -> dict[str, Any]:
    keys = [k for k, v in runs[0]["summary"].items() if isinstance(v, float) or v is None]
    out = {}
    for k in keys:
        vals = [r["summary"][k] for r in runs if r["summary"][k] is not None]
        out[k] = statistics.median(vals) if vals else None
    firsts = [r["first_ttft_ms"] for r in runs if r["first_ttft_ms"] is not None]
    out["first_ttft_ms"] = statistics.median(firsts) if firsts else None
    return out


# ---- the client ---------------------------------------------------------------------------

class SSEReader:
    """Incremental HTTP/1.1 body decoder (chunked or not) that returns complete SSE events."""

    def __init__(self, chunked: bool):
        self.chunked = chunked
        self.raw = b""
        self.body = b""
        self.need = None  # bytes left of the current chunk (chunked), None: read a size line
        self.ended = False

    def feed(self, data: bytes) -> list[bytes]:
        if not self.chunked:
            self.body += data
        else:
            self.raw += data
            while not self.ended:
                if self.need is None:
                    line, sep, rest = self.raw.partition(b"\r\n")
                    if not sep:
                        break
                    self.need = int(line.split(b";")[0], 16)
                    self.raw = rest
                    if self.need == 0:
                        self.ended = True
                        break
                if len(self.raw) < self.need + 2:  # the payload and its CRLF
                    break
                self.body += self.raw[:self.need]
                self.raw = self.raw[self.need + 2:]
                self.need = None
        events = self.body.split(b"\n\n")
        self.body = events.pop()
        return [e for e in events if e.strip()]


async def stream_one(host: str, port: int, payload: dict, timeout: float) -> dict:
    """One streamed request on its own connection; per event: (time since sent, tokens)."""
    body = json.dumps(payload).encode()
    rec: dict[str, Any] = {"error": None, "status": None, "events": [], "usage_tokens": None,
                           "held_text_events": 0}
    writer = None
    t0 = time.perf_counter()

    async def run() -> None:
        nonlocal writer
        reader, writer = await asyncio.open_connection(host, port)  # asyncio: TCP_NODELAY
        writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close"
                      "\r\n\r\n").encode() + body)
        rec["sent_s"] = time.perf_counter() - t0
        head = await reader.readuntil(b"\r\n\r\n")
        now = time.perf_counter()
        head, rest = head[:-4], b""
        lines = head.decode("latin-1").split("\r\n")
        rec["status"] = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        sse = SSEReader("chunked" in hdrs.get("transfer-encoding", "").lower())
        if rec["status"] != 200:
            rest = await reader.read(4096)
            rec["error"] = f"HTTP {rec['status']}: {rest[-300:].decode(errors='replace')}"
            return
        data = rest
        while True:
            for ev in sse.feed(data):
                text = ev.decode()
                if not text.startswith("data: "):
                    continue
                if text == "data: [DONE]":
                    return
                obj = json.loads(text[6:])
                if "error" in obj:
                    rec["error"] = f"error event: {obj['error']}"
                    return
                if obj.get("usage"):
                    rec["usage_tokens"] = obj["usage"].get("completion_tokens")
                n, held = 0, False
                for c in obj.get("choices") or []:
                    k = len(c.get("token_ids") or [])
                    n += k
                    held |= k > 0 and not c.get("text")
                if obj.get("choices"):
                    rec["events"].append((now - t0, n))
                    rec["held_text_events"] += held
            data = await reader.read(1 << 16)
            now = time.perf_counter()
            if not data:
                rec["error"] = "the connection closed before [DONE]"
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        rec["error"] = f"timed out after {timeout:.0f} s"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return rec


def request_record(raw: dict, max_tokens: int) -> dict:
    events = raw.pop("events")
    times = token_times(events)
    out = {"status": raw["status"], "error": raw["error"], "max_tokens": max_tokens,
           "num_tokens": len(times), "usage_tokens": raw["usage_tokens"],
           "num_events": len(events), "zero_token_events": sum(n == 0 for _, n in events),
           "multi_token_events": sum(n > 1 for _, n in events),
           # the first token (1-based) of each event that carried several: 1 = tokens 1 and 2
           # came together (a token-2 gap of 0)
           "multi_token_at": [1 + sum(m for _, m in events[:i])
                              for i, (_, n) in enumerate(events) if n > 1],
           "held_text_events": raw["held_text_events"],
           "e2e_ms": times[-1] * 1e3 if times else None,
           **handoff_numbers(times, raw.get("sent_s", 0.0))}
    if out["error"] is None and len(times) < min(3, max_tokens):
        out["error"] = f"only {len(times)} tokens"
    return out


async def run_load(url: str, prompts: list[list[int]], arrivals: list[float] | None,
                   output_len: int, timeout: float, model: str | None) -> list[dict]:
    """`prompts` streamed one after another (arrivals None) or at `arrivals` (s from now)."""
    host, port = url.removeprefix("http://").split(":")

    def payload(p: list[int]) -> dict:
        d = {"prompt": p, "max_tokens": output_len, "ignore_eos": True, "stream": True,
             "return_token_ids": True, "temperature": 0.0,
             "stream_options": {"include_usage": True}}
        return {"model": model, **d} if model else d

    async def one(i: int, p: list[int], start: float) -> dict:
        t = time.perf_counter()
        r = request_record(await stream_one(host, int(port), payload(p), timeout), output_len)
        return {"i": i, "start_s": t - start, **r}

    start = time.perf_counter()
    if arrivals is None:
        return [await one(i, p, start) for i, p in enumerate(prompts)]
    tasks = []
    for i, (p, at) in enumerate(zip(prompts, arrivals)):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i, p, start)))
    return list(await asyncio.gather(*tasks))


# ---- processes ----------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when this script dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out = []
    for k in children(pid):
        out += [k, *descendants(k)]
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cpu_ticks(pid: int) -> int | None:
    """utime + stime (all threads) + cutime + cstime (children it reaped), in clock ticks."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def worker_label(argv: list[str]) -> str | None:
    """'prefill-worker:8100' for a `pdserve worker` process, else None."""
    if "worker" not in argv or "--role" not in argv:
        return None
    role = argv[argv.index("--role") + 1]
    port = argv[argv.index("--port") + 1] if "--port" in argv else "?"
    return f"{role}-worker:{port}"


class Cluster:
    """The processes of one mode, each in its own process group, logs under `log_dir`."""

    def __init__(self, name: str, log_dir: Path):
        self.name, self.log_dir = name, log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        self.url = ""
        self.launched = time.monotonic()

    def start(self, label: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.log_dir / f"{label}.log"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append((label, p))
        return p

    def groups(self) -> dict[str, list[int]]:
        """Process name -> its pids: each started process with its descendants, but every
        `pdserve worker` below one (a local cluster's) as a name of its own."""
        out: dict[str, list[int]] = {}

        def walk(pid: int, name: str) -> None:
            out.setdefault(name, []).append(pid)
            for k in children(pid):
                walk(k, worker_label(cmdline(k)) or name)

        for label, p in self.procs:
            if p.poll() is None:
                walk(p.pid, label)
        return out

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        before = {name: {pid: cpu_ticks(pid) for pid in pids}
                  for name, pids in self.groups().items()}
        time.sleep(seconds)
        out = {}
        for name, pids in self.groups().items():
            ticks = 0
            for pid in pids:
                now, then = cpu_ticks(pid), before.get(name, {}).get(pid)
                if now is not None:
                    ticks += now - (then or 0)
            out[name] = round(100.0 * ticks / _TICK / seconds, 2)
        return out

    def check_alive(self) -> None:
        for label, p in self.procs:
            if p.poll() is not None:
                tail = (self.log_dir / f"{label}.log").read_text()[-2500:]
                raise RuntimeError(f"{label} exited with code {p.returncode}; the end of its "
                                   f"log {self.log_dir / (label + '.log')}:\n{tail}")

    def stop(self) -> None:
        tree = {p.pid: descendants(p.pid) for _, p in self.procs if p.poll() is None}
        for _, p in reversed(self.procs):  # SIGINT: serve drains and stops its workers
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for _, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(10)
        for pid in (k for kids in tree.values() for k in kids):  # started, then moved away
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError) as e:
        return 0, str(e)


def wait_ready(cluster: Cluster, want: str, timeout: float) -> dict:
    """Until the proxy's /health is 200 and its `serves` says `want`; the health JSON."""
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        cluster.check_alive()
        status, text = http_get(cluster.url + "/health", 2)
        if status in (200, 503):
            try:
                health = json.loads(text)
            except ValueError:
                health = {}
            last = health.get("serves") or health.get("reason") or text[:300]
            if status == 200 and want in (health.get("serves") or ""):
                return health
        time.sleep(0.1)
    raise RuntimeError(f"{cluster.name}: not ready after {timeout:.0f} s (last /health: "
                       f"{last}); logs in {cluster.log_dir}")


def gpu_list(spec: str) -> list[str]:
    """--gpu '0' or '0,1': the GPU indices of the gpu modes, in order."""
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise SystemExit(f"--gpu: GPU indices separated by commas, e.g. 0 or 0,1; got {spec!r}")
    return gpus


def launch(mode: str, args: argparse.Namespace, cluster: Cluster, work: Path) -> str:
    """Start `mode`'s processes; what /health's `serves` must say once they are up."""
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PDSERVE_CONFIG", None)
    if mode.startswith("cpu"):
        env["OMP_NUM_THREADS"] = "1"
    port = free_port(1)
    cluster.url = f"http://127.0.0.1:{port}"
    serve = [py, "-m", "pdserve", "serve", "--port", str(port), "--min-pd-prompt-tokens", "0",
             *args.serve_arg]
    cluster.launched = time.monotonic()
    if mode == "cpu-fake":
        env["PDSERVE_INTERNAL_TOKEN"] = secrets.token_hex(16)  # the fakes check it
        urls = {}
        for role in ("prefill", "decode"):
            wp = free_port(2)
            urls[role] = f"http://127.0.0.1:{wp}"
            cluster.start(f"fake-{role}", [py, str(HERE / "fake_worker.py"), "--role", role,
                                           "--port", str(wp), "--ttft-ms", "0", "--itl-ms",
                                           str(args.fake_itl_ms)], env)
        cluster.start("proxy", [*serve, "--prefill", urls["prefill"], "--decode",
                                urls["decode"]], env)
        return "prefill/decode"
    if mode == "cpu-builtin":
        env.pop("PDSERVE_INTERNAL_TOKEN", None)  # a local cluster draws its own
        cluster.start("proxy", [*serve, "--num-prefill", "1", "--num-decode", "1",
                                "--worker-base-port", str(free_port(6)),
                                "--torch-threads", "1"], env)
        return "prefill/decode"
    # gpu: Llama-3-8B shapes, dummy weights, token ids only (no tokenizer for these shapes)
    model = work / "llama-3-8b"
    if not (model / "config.json").exists():
        from serving_gpu import LLAMA3_8B  # bench/ is this script's folder

        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    engine = ["--model", str(model), "--load-format", "dummy", "--dtype", "bfloat16",
              "--skip-tokenizer-init", "--max-model-len", str(args.gpu_max_model_len),
              "--kv-cache-memory-bytes", str(args.gpu_kv_bytes)]
    gpus = gpu_list(args.gpu)
    if mode in ("gpu-pd", "gpu-pd-timeslice"):
        env.pop("PDSERVE_INTERNAL_TOKEN", None)
        mps = ["--mps", "off"] if mode == "gpu-pd-timeslice" else []
        cluster.start("proxy", [*serve, *engine, "--num-prefill", "1", "--num-decode", "1",
                                "--local-devices", gpus[0], gpus[-1],
                                "--worker-base-port", str(free_port(6)), *mps], env)
        return "prefill/decode"
    env["PDSERVE_INTERNAL_TOKEN"] = secrets.token_hex(16)  # in the environment, not argv
    urls = []
    for i, gpu in enumerate(gpus):  # one both-role worker per listed GPU
        wp = free_port(3)
        urls += ["--worker", f"http://127.0.0.1:{wp}"]
        cluster.start(f"both-worker-{i}" if len(gpus) > 1 else "both-worker",
                      [py, "-m", "pdserve", "worker", "--role", "both", *engine, "--port",
                       str(wp), "--device", gpu, *args.worker_arg], env)
    cluster.start("proxy", [*serve, "--model", str(model), "--skip-tokenizer-init", *urls], env)
    return "both-role"


# ---- metrics ------------------------------------------------------------------------------

def parse_prom(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple], float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError:
        pass
    return out


def scrape(cluster: Cluster) -> dict[str, dict]:
    """Every /metrics the cluster has: the proxy's and each worker's (the fakes have none)."""
    out = {"proxy": parse_prom(http_get(cluster.url + "/metrics", 10)[1])}
    _, text = http_get(cluster.url + "/health", 5)
    try:
        workers = json.loads(text).get("workers", [])
    except ValueError:
        workers = []
    for w in workers:
        status, body = http_get(w["url"] + "/metrics", 10)
        if status == 200:
            out[f"{w['role']}@{w['url'].rsplit(':', 1)[-1]}"] = parse_prom(body)
    return out


def metric_deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, Any]:
    """{source: {histogram: {labels: {count, sum, mean}}, counter: {labels: delta}}} over the
    interval, for the histograms HISTOGRAMS matches and the COUNTERS."""
    res: dict[str, Any] = {}
    for src, flat in after.items():
        old = before.get(src, {})
        mine: dict[str, Any] = {}
        for (name, labels), v in flat.items():
            key = ",".join(f"{k}={x}" for k, x in labels if k != "le") or "all"
            if name.endswith("_count") and HISTOGRAMS.search(name[:-6]):
                base = name[:-6]
                count = v - old.get((name, labels), 0.0)
                total = flat.get((base + "_sum", labels), 0.0) - old.get((base + "_sum", labels),
                                                                         0.0)
                label = dict(labels).get("stage", key) if len(labels) == 1 else key
                mine.setdefault(base, {})[label] = {
                    "count": int(count), "sum": total, "mean": total / count if count else None}
            elif name in COUNTERS:
                delta = v - old.get((name, labels), 0.0)
                if delta:
                    mine.setdefault(name, {})[key] = delta
        if mine:
            res[src] = mine
    return res


# ---- one mode -----------------------------------------------------------------------------

def run_mode(mode: str, args: argparse.Namespace, root: Path, results: dict, save) -> None:
    w = dict(WORKLOADS[mode])
    for k in ("prompt_len", "output_len", "rate"):
        if getattr(args, k) is not None:
            w[k] = getattr(args, k)
    res: dict[str, Any] = {"workload": w, "runs": [], "log_dir": str(root / mode)}
    results["modes"][mode] = res
    cluster = Cluster(mode, root / mode)
    print(f"== {mode}: logs in {cluster.log_dir}", flush=True)
    try:
        want = launch(mode, args, cluster, root)
        health = wait_ready(cluster, want, args.ready_timeout)
        res["ready_s"] = time.monotonic() - cluster.launched
        res["serves"] = health.get("serves")
        res["commands"] = {label: " ".join(p.args) for label, p in cluster.procs}
        # a local cluster's workers log where `pdserve serve` says (copied here at the end)
        proxy_log = (cluster.log_dir / "proxy.log").read_text()
        res["worker_logs"] = re.findall(r"\(log (\S+\.log)\)", proxy_log)
        # a local cluster's MPS decision (pdserve serve --mps), as it logged it
        res["mps"] = [ln.strip() for ln in proxy_log.splitlines() if "MPS" in ln][:2]
        print(f"   ready in {res['ready_s']:.1f} s: {res['serves']}", flush=True)
        save()
        arr_rng = np.random.default_rng(args.seed)
        arrivals = None
        if w["rate"] > 0:
            gaps = arr_rng.exponential(1.0 / w["rate"], args.num_requests)
            arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]).tolist()

        def prompts(stream: int, n: int) -> list[list[int]]:
            rng = np.random.default_rng([args.seed, stream])
            return [rng.integers(5, w["vocab_high"], w["prompt_len"]).tolist() for _ in range(n)]

        model = None  # token ids only; the proxy serves one model
        warm = asyncio.run(run_load(cluster.url, prompts(10_000, args.warmup), None,
                                    w["output_len"], args.request_timeout, model))
        res["warmup_ttft_ms"] = [r["ttft_ms"] for r in warm]
        res["warmup_errors"] = [r["error"] for r in warm if r["error"]]
        before = scrape(cluster)
        for run in range(args.runs):
            cluster.check_alive()
            t0 = time.monotonic()
            reqs = asyncio.run(run_load(cluster.url, prompts(run, args.num_requests), arrivals,
                                        w["output_len"], args.request_timeout, model))
            s = summarize(reqs)
            res["runs"].append({"run": run, "wall_s": time.monotonic() - t0,
                                "loadavg": os.getloadavg(), "summary": s,
                                "first_ttft_ms": reqs[0]["ttft_ms"] if reqs else None,
                                "requests": reqs})
            res["median"] = median_of_runs(res["runs"])
            save()
            print(f"   run {run}: {s['ok']} ok / {s['failed']} failed in "
                  f"{time.monotonic() - t0:.1f} s; TTFT p50 {fmt(s['ttft_ms_p50'])}, token-2 "
                  f"gap p50 {fmt(s['token2_gap_ms_p50'])}, ITL p50 {fmt(s['itl_ms_p50'])}, "
                  f"excess p50 {fmt(s['excess_ms_p50'])} p90 {fmt(s['excess_ms_p90'])} ms",
                  flush=True)
            errors = [r["error"] for r in reqs if r["error"]]
            if errors:
                print(f"   errors ({len(errors)}), first: {errors[0]}", flush=True)
        res["metrics"] = metric_deltas(before, scrape(cluster))
        save()
        time.sleep(args.settle_s)
        res["idle_cpu_percent"] = cluster.idle_cpu(args.idle_seconds)
        print(f"   idle CPU % over {args.idle_seconds:g} s: {res['idle_cpu_percent']}", flush=True)
        save()
    except Exception as e:  # the next mode still runs; the JSON says what failed
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"   {mode} failed: {res['error']}", flush=True)
        save()
    finally:
        cluster.stop()
        for path in res.get("worker_logs", []):
            try:
                shutil.copy(path, cluster.log_dir / Path(path).name)
            except OSError:
                pass


def fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


def table(results: dict) -> str:
    lines = ["| mode | ready_s | TTFT p50 ms | token-2 gap p50 ms | ITL p50 ms | excess p50 / p90 "
             "ms | first TTFT ms | idle CPU % |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        m = r.get("median") or {}
        idle = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("idle_cpu_percent") or {}).items())
        runs = len(r.get("runs", []))
        lines.append(f"| {mode} ({runs} run{'s' if runs != 1 else ''}) | "
                     f"{fmt(r.get('ready_s'), 1)} | {fmt(m.get('ttft_ms_p50'))} | "
                     f"{fmt(m.get('token2_gap_ms_p50'))} | {fmt(m.get('itl_ms_p50'))} | "
                     f"{fmt(m.get('excess_ms_p50'))} / {fmt(m.get('excess_ms_p90'))} | "
                     f"{fmt(m.get('first_ttft_ms'), 1)} | "
                     f"{idle or r.get('error', '-').splitlines()[0][:100]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="cpu", choices=[*WORKLOADS, *GROUPS])
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="uncounted requests first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=None, help="default: the mode's")
    ap.add_argument("--output-len", type=int, default=None, help="default: the mode's")
    ap.add_argument("--rate", type=float, default=None, help="Poisson req/s; 0: sequential "
                    "(default: the mode's)")
    ap.add_argument("--fake-itl-ms", type=float, default=10.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=1.0, help="wait before the idle window")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--gpu", default="0", help="GPU index of the gpu modes; two (0,1): "
                    "gpu-pd puts P on the first and D on the second, gpu-both runs one "
                    "both-role worker on each (issue 25's two-GPU comparison)")
    ap.add_argument("--gpu-kv-bytes", type=int, default=8 << 30,
                    help="KV pool of each GPU worker (8 GiB: 64k tokens of Llama-3-8B)")
    ap.add_argument("--gpu-max-model-len", type=int, default=8192)
    ap.add_argument("--serve-arg", action="append", default=[], help="passed to `pdserve "
                    "serve` (repeat; --serve-arg=--flag --serve-arg=value)")
    ap.add_argument("--worker-arg", action="append", default=[], help="passed to the "
                    "gpu-both worker")
    ap.add_argument("--out", default=None, help="JSON file (default: in the log folder)")
    ap.add_argument("--log-dir", default=None, help="default: a new temporary folder")
    args = ap.parse_args(argv)
    root = Path(args.log_dir or tempfile.mkdtemp(prefix="handoff-"))
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else root / "handoff.json"
    print(f"logs in {root}; JSON to {out}", flush=True)
    results: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(),
                               "loadavg_start": os.getloadavg(), "started": time.time(),
                               "modes": {}}

    def save() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for mode in GROUPS.get(args.mode, [args.mode]):
            run_mode(mode, args, root, results, save)
    except KeyboardInterrupt:
        print("interrupted: the processes are stopped", flush=True)
        results["interrupted"] = True
    finally:
        results["loadavg_end"] = os.getloadavg()
        save()
    print(f"\nmedians over runs; JSON {out}, logs {root}")
    print(table(results))


if __name__ == "__main__":
    main()
