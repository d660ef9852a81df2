"""`pdserve bench`: an async load generator for any OpenAI-compatible server.

A run: build `--num-prompts` prompts from a seeded generator (token ids for /v1/completions,
so no tokenizer is needed; words for chat) -> schedule arrivals (Poisson at each
`--request-rate`, `inf` = all at once; `--concurrency` caps requests in flight) -> stream
each request (`ignore_eos`, fixed `max_tokens`, usage in the last chunk) over one
keep-alive HTTP/1.1 connection pool, recording the arrival time of every SSE event ->
parse the events after the stream ends (the hot loop only splits bytes) -> summary, table,
`--result-json` and `--plot-dir` PNGs (pdserve/bench_metrics.py defines every number).

Prompt lengths (`--input-len-dist`): `fixed` = `--input-len`; `uniform` = integers in
[input_len·(1 − range_ratio), input_len·(1 + range_ratio)]; `sharegpt` = a ShareGPT-like
heavy tail generated locally: round(LogNormal(μ = ln(input_len), σ = 1.1)) clipped to
[4, 8·input_len], so `--input-len` is the median (the mean is ≈ 1.8× it) and about 1 prompt
in 30 is over 7× the median. Output lengths are always `--output-len` (ignore_eos).
Completions prompts are uniform random ids in [vocab_low, vocab_high), fresh per prompt,
so prefix caches do not hit; chat prompts are `input_len` common English words (≈ one token
each; the server's usage gives the exact count, used in the report).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pdserve.common.options import option
from pdserve.config import ConfigError, build_config


def _pos(v: float | None) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def _rates(v: list[float]) -> str | None:
    return None if v and all(x > 0 for x in v) else "each rate must be > 0 (inf: all at once)"


def _url(v: str) -> str | None:
    return None if v.startswith(("http://", "https://")) else "must be an http(s) URL"


@dataclass(frozen=True)
class BenchConfig:
    """`pdserve bench`: what to send, how fast, and where the report goes."""

    base_url: str = option("http://127.0.0.1:8000", check=_url, help="Server root; '/v1' is "
                           "added (a URL already ending in /v1 is fine).", metavar="URL")
    api_key: str | None = option(None, secret=True, metavar="KEY",
                                 help="Bearer key for the server.")
    served_model_name: str | None = option(None, flag="--model", metavar="NAME", help="Model "
                                           "name to request (default: the first of GET "
                                           "/v1/models).")
    endpoint: Literal["completions", "chat"] = option(
        "completions", help="completions sends token ids; chat sends words (lengths approx.).")
    num_prompts: int = option(100, check=_pos, help="Requests per run (per request rate).")
    input_len_dist: Literal["fixed", "uniform", "sharegpt"] = option(
        "fixed", help="Prompt lengths: fixed, uniform (±range_ratio), sharegpt (lognormal, "
        "median input_len, σ 1.1, clipped to [4, 8·input_len]).")
    input_len: int = option(128, check=_pos, help="Prompt tokens (the median for sharegpt).")
    range_ratio: float = option(0.5, check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                                help="uniform: lengths in input_len·[1 − r, 1 + r].")
    output_len: int = option(128, check=_pos, help="max_tokens of every request (ignore_eos).")
    workload: str | None = option(None, metavar="PATH", help="A length mix (JSON with "
                                  "\"pairs\": [[prompt tokens, output tokens], ...], e.g. "
                                  "bench/data/sharegpt_like.json): each request draws a pair "
                                  "(seeded); replaces --input-len-dist, --input-len and "
                                  "--output-len.")
    vocab_low: int = option(5, check=lambda v: None if v >= 0 else "must be >= 0",
                            help="Smallest random prompt token id.")
    vocab_high: int = option(4000, check=_pos, help="Random prompt token ids are < this.")
    request_rate: list[float] = option(default_factory=lambda: [math.inf], check=_rates,
                                       help="Poisson arrival rate(s), req/s; several = one run "
                                       "each; inf = all at once.", metavar="RATE")
    concurrency: int | None = option(None, check=_pos, help="Most requests in flight (a fixed "
                                     "concurrency with --request-rate inf).")
    seed: int = option(0, help="Seed of prompt lengths, token ids and arrival times.")
    temperature: float = option(0.0, check=lambda v: None if v >= 0 else "must be >= 0",
                                help="Sampling temperature sent with every request.")
    ignore_eos: bool = option(True, help="Ask the server to generate exactly --output-len.")
    slo_ttft_ms: float | None = option(None, check=_pos, help="Goodput SLO: TTFT at most this.")
    slo_tpot_ms: float | None = option(None, check=_pos, help="Goodput SLO: TPOT at most this.")
    timeout: float = option(600.0, check=_pos, help="Seconds one request may take.")
    result_json: str | None = option(None, help="Write every request's timings and the "
                                     "summary here.", metavar="PATH")
    plot_dir: str | None = option(None, help="Write latency CDF PNGs (and goodput vs rate) "
                                  "here; needs matplotlib (pdserve[bench]).", metavar="DIR")
    progress: bool = option(True, help="Show a progress bar (on stderr).")

    def __post_init__(self) -> None:
        if self.vocab_low >= self.vocab_high:
            raise ValueError("--vocab-low must be below --vocab-high")
        if self.workload:
            load_workload(self.workload)  # a bad file is a one-line error before any request


# ---- prompts ------------------------------------------------------------------------------

SHAREGPT_SIGMA = 1.1
SHAREGPT_MAX_FACTOR = 8
_WORDS = ("the of and to in is you that it he was for on are as with his they at be this "
          "have from or one had by word but not what all were we when your can said there use "
          "an each which she do how their if will up other about out many then them these so "
          "some her would make like him into time has look two more write go see number no way "
          "could people my than first water been call who oil its now find long down day did "
          "get come made may part").split()


def load_workload(path: str) -> list[tuple[int, int]]:
    """The (prompt tokens, output tokens) pairs of a --workload file."""
    try:
        pairs = json.loads(Path(path).read_text())["pairs"]
        out = [(int(p), int(o)) for p, o in pairs]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--workload {path}: not a length mix ({e})") from e
    if not out or any(p < 1 or o < 1 for p, o in out):
        raise ValueError(f"--workload {path}: needs pairs of positive lengths")
    return out


def lengths(cfg: BenchConfig, rng: Any) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens) per request."""
    if cfg.workload:
        pairs = load_workload(cfg.workload)
        return [pairs[int(i)] for i in rng.integers(0, len(pairs), cfg.num_prompts)]
    return [(n, cfg.output_len) for n in input_lengths(cfg, rng)]


def input_lengths(cfg: BenchConfig, rng: Any) -> list[int]:
    n, mid = cfg.num_prompts, cfg.input_len
    if cfg.input_len_dist == "fixed":
        return [mid] * n
    if cfg.input_len_dist == "uniform":
        lo = max(1, round(mid * (1 - cfg.range_ratio)))
        hi = max(lo, round(mid * (1 + cfg.range_ratio)))
        return [int(x) for x in rng.integers(lo, hi + 1, n)]
    raw = rng.lognormal(math.log(mid), SHAREGPT_SIGMA, n)
    return [int(min(max(round(x), 4), SHAREGPT_MAX_FACTOR * mid)) for x in raw]


def make_prompts(cfg: BenchConfig, rng: Any) -> list[tuple[Any, int, int]]:
    """(prompt, its length, max_tokens) per request: id lists for completions, word strings
    for chat."""
    out: list[tuple[Any, int, int]] = []
    for n, m in lengths(cfg, rng):
        if cfg.endpoint == "completions":
            out.append((rng.integers(cfg.vocab_low, cfg.vocab_high, n).tolist(), n, m))
        else:
            out.append((" ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n)), n, m))
    return out


def arrival_times(n: int, rate: float, rng: Any) -> list[float]:
    """Seconds from the run's start; the first request goes at 0."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.exponential(1.0 / rate, n)
    t, out = 0.0, []
    for g in gaps:
        out.append(t)
        t += float(g)
    return out


# ---- one request ----------------------------------------------------------------------------

def request_body(cfg: BenchConfig, model: str, prompt: Any,
                 max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens or cfg.output_len,
                            "stream": True,
                            "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _carries_output(choice: dict[str, Any]) -> bool:
    if choice.get("text") or choice.get("token_ids"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"))


def parse_events(events: list[tuple[float, bytes]], r: Any) -> None:
    """Fill `r` (a RequestResult) from the raw SSE events (arrival time, event bytes)."""
    from pdserve.bench_metrics import RequestResult

    assert isinstance(r, RequestResult)
    done = False
    for t, ev in events:
        for line in ev.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments, event names, ids
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                r.error = "malformed SSE data"
                return
            if "error" in obj:
                err = obj["error"]
                r.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                return
            if any(isinstance(c, dict) and _carries_output(c) for c in obj.get("choices") or ()):
                r.chunk_times.append(t)
            usage = obj.get("usage")
            if usage:
                r.usage_reported = True
                r.num_output_tokens = int(usage.get("completion_tokens", 0))
                r.num_input_tokens = int(usage.get("prompt_tokens", r.num_input_tokens))
    if not r.usage_reported:
        r.num_output_tokens = len(r.chunk_times)
    if not done:
        r.error = "stream ended without [DONE]"
    elif not r.chunk_times:
        r.error = "no output tokens in the response"
    else:
        r.ok = True


async def send_one(client: Any, url: str, body: dict[str, Any], r: Any, t0: float) -> None:
    """Stream one request into `r`; never raises (a failure is recorded in `r.error`)."""
    import httpx

    sent = time.perf_counter()
    r.start = sent - t0
    events: list[tuple[float, bytes]] = []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread())[:200].decode("utf-8", "replace")
                r.error = f"HTTP {resp.status_code}: {text}"
                r.end = time.perf_counter() - sent
                return
            buf = b""
            async for raw in resp.aiter_raw():
                now = time.perf_counter() - sent  # one stamp per read: when we saw the bytes
                buf += raw.replace(b"\r\n", b"\n") if b"\r" in raw else raw
                while (i := buf.find(b"\n\n")) >= 0:
                    events.append((now, buf[:i]))
                    buf = buf[i + 2:]
            if buf.strip():
                events.append((time.perf_counter() - sent, buf))
        r.end = time.perf_counter() - sent
    except (httpx.HTTPError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        r.end = time.perf_counter() - sent
        return
    try:
        parse_events(events, r)
    except (TypeError, ValueError, AttributeError) as e:  # a server's odd JSON shapes
        r.ok, r.error = False, f"unreadable response: {type(e).__name__}: {e}"


# ---- runs -----------------------------------------------------------------------------------

def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


async def first_model(client: Any, root: str) -> str:
    import httpx

    try:
        resp = await client.get(root + "/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"cannot read the model name from {root}/models ({e}); pass --model",
                          "served_model_name") from e


async def run_rate(cfg: BenchConfig, client: Any, url: str, model: str, rate: float,
                   prompts: list[tuple[Any, int, int]], arrivals: list[float]
                   ) -> dict[str, Any]:
    """One run at one request rate: every prompt sent, every outcome recorded."""
    from tqdm import tqdm

    from pdserve.bench_metrics import RequestResult, summarize

    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    results = [RequestResult(i, num_input_tokens=n) for i, (_, n, _) in enumerate(prompts)]
    bodies = [request_body(cfg, model, p, m) for p, _, m in prompts]
    bar = tqdm(total=len(prompts), desc=f"rate {rate:g}", unit="req", file=sys.stderr,
               disable=not cfg.progress, dynamic_ncols=True)
    started_at = time.time()  # wall clock: runs of several client processes line up
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is None:
            await send_one(client, url, bodies[i], results[i], t0)
        else:
            async with sem:  # time spent waiting here is not part of the request's latency
                await send_one(client, url, bodies[i], results[i], t0)
        bar.update(1)

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    duration = time.perf_counter() - t0
    bar.close()
    summary = summarize(results, duration, slo_ttft_ms=cfg.slo_ttft_ms,
                        slo_tpot_ms=cfg.slo_tpot_ms)
    return {"request_rate": rate, "concurrency": cfg.concurrency, "summary": summary,
            "started_at": started_at, "results": results}


async def run_all(cfg: BenchConfig) -> tuple[str, list[dict[str, Any]]]:
    import httpx
    import numpy as np

    root = api_root(cfg.base_url)
    url = root + ("/chat/completions" if cfg.endpoint == "chat" else "/completions")
    pool = cfg.concurrency or cfg.num_prompts
    headers = {"accept-encoding": "identity"}  # raw SSE bytes: nothing to decompress
    if cfg.api_key:
        headers["authorization"] = f"Bearer {cfg.api_key}"
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 30.0))
    async with httpx.AsyncClient(http1=True, http2=False, limits=limits, timeout=timeout,
                                 headers=headers) as client:
        model = cfg.served_model_name or await first_model(client, root)
        runs = []
        for k, rate in enumerate(cfg.request_rate):
            rng = np.random.default_rng([cfg.seed, k])  # each run reproducible on its own
            prompts = make_prompts(cfg, rng)
            arrivals = arrival_times(len(prompts), rate, rng)
            runs.append(await run_rate(cfg, client, url, model, rate, prompts, arrivals))
    return model, runs


def _rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _jsonable(cfg: BenchConfig, model: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    from pdserve import __version__

    conf = dataclasses.asdict(cfg)
    conf["api_key"] = "***" if cfg.api_key else None
    conf["request_rate"] = [_rate_text(r) for r in cfg.request_rate]
    return {"tool": f"pdserve bench {__version__}", "date": datetime.now(UTC).isoformat(),
            "model": model, "config": conf,
            "runs": [{"request_rate": _rate_text(r["request_rate"]),
                      "concurrency": r["concurrency"], "started_at": r["started_at"],
                      "summary": r["summary"],
                      "requests": [x.to_json() for x in r["results"]]} for r in runs]}


def report(cfg: BenchConfig, model: str, runs: list[dict[str, Any]]) -> None:
    """Print the tables; write the JSON and the plots if asked."""
    from pdserve.bench_metrics import MISSING_MATPLOTLIB, format_table, plot_cdfs, plot_rates

    for r in runs:
        title = (f"pdserve bench: {model}, rate {_rate_text(r['request_rate'])}, "
                 f"concurrency {cfg.concurrency or 'unbounded'}")
        print(format_table(r["summary"], title))
    if cfg.result_json:
        path = Path(cfg.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(cfg, model, runs), indent=1))
        print(f"results: {path}")
    if cfg.plot_dir:
        out = Path(cfg.plot_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for r in runs:
            p = out / f"latency_cdf_rate_{_rate_text(r['request_rate'])}.png"
            if not plot_cdfs(r["results"], p, f"{model}, rate {_rate_text(r['request_rate'])}"):
                print(MISSING_MATPLOTLIB, file=sys.stderr)
                return
            written.append(p)
        if len(runs) > 1 and plot_rates(runs, out / "goodput_vs_rate.png"):
            written.append(out / "goodput_vs_rate.png")
        print("plots: " + ", ".join(map(str, written)))


def check_plot_dir(path: Path) -> None:
    """ConfigError now if --plot-dir cannot be honoured (no matplotlib, or a folder that
    cannot be made or written), so a long run does not end without its plots."""
    from pdserve.bench_metrics import MISSING_MATPLOTLIB, _pyplot

    if _pyplot() is None:
        raise ConfigError(MISSING_MATPLOTLIB, "plot_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--plot-dir {path}: cannot create it ({e.strerror})",
                          "plot_dir") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--plot-dir {path}: not writable", "plot_dir")


def run_bench(argv: Sequence[str]) -> int:
    """The `pdserve bench` command: 0 if any request succeeded, 1 if every one failed."""
    import pdserve.serve  # noqa: F401 - registers serve's PDSERVE_* names (not typos here)

    cfg = build_config(BenchConfig, argv, prog="pdserve bench", description=(
        "Load-test an OpenAI-compatible server: streamed requests at Poisson request rates or "
        "a fixed concurrency; reports TTFT, token-2, TPOT, ITL and E2E (mean/p50/p90/p99), "
        "throughput and goodput under SLOs."))
    if cfg.plot_dir:
        check_plot_dir(Path(cfg.plot_dir))  # before the load, not after it
    model, runs = asyncio.run(run_all(cfg))
    report(cfg, model, runs)
    return 0 if any(r["summary"]["completed"] for r in runs) else 1
