"""The load generator's numbers: per-request timings in, summary, table and plots out.

Pure functions over `RequestResult`s, so the definitions can be tested on synthetic
timestamps (tests/bench/test_metrics.py) without a server:

- TTFT: request sent -> first chunk that carries output (text, content or token ids). A
  chat stream's role-only first chunk carries nothing and does not count.
- token-2: first output chunk -> second output chunk (the P -> D hand-off shows up here).
- TPOT: (e2e - TTFT) / (output tokens - 1), per request; undefined for 1-token outputs.
- ITL: every gap between consecutive output chunks, pooled over all requests.
- e2e: request sent -> end of the response stream.
- Throughput: successful requests and their output tokens per second of the run's wall
  time (first request sent -> last response ended).
- Goodput: successful requests meeting every given SLO (TTFT <= slo_ttft_ms and TPOT <=
  slo_tpot_ms; a 1-token request has no TPOT and meets that SLO) per second.

Percentiles interpolate linearly between order statistics (numpy's default), so p50 of
[1, 2, 3, 4] is 2.5. Failed requests never enter latency figures; they are counted and
their errors listed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "token2", "tpot", "itl", "e2e")
_LABELS = {"ttft": "TTFT", "token2": "token-2", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}


@dataclass
class RequestResult:
    """One request's outcome. Times are seconds: `start` from the run's start, `chunk_times`
    (arrival of each output-carrying chunk) and `end` from this request's send."""

    index: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    num_input_tokens: int = 0  # what we sent (token ids) or the usage's prompt_tokens
    num_output_tokens: int = 0  # the usage's completion_tokens, else output chunks
    usage_reported: bool = False

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.ok and self.chunk_times else None

    @property
    def token2(self) -> float | None:
        ok = self.ok and len(self.chunk_times) >= 2
        return self.chunk_times[1] - self.chunk_times[0] if ok else None

    @property
    def tpot(self) -> float | None:
        return tpot(self.end, self.chunk_times[0], self.num_output_tokens) \
            if self.ok and self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])] if self.ok else []

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "ok": self.ok, "error": self.error,
                "start_s": self.start, "ttft_s": self.ttft, "token2_s": self.token2,
                "tpot_s": self.tpot, "e2e_s": self.end if self.ok else None,
                "chunk_times_s": self.chunk_times, "itl_s": self.itls,
                "num_input_tokens": self.num_input_tokens,
                "num_output_tokens": self.num_output_tokens,
                "usage_reported": self.usage_reported}


def tpot(e2e: float, ttft: float, num_output_tokens: int) -> float | None:
    """Time per output token after the first; None for outputs of fewer than 2 tokens."""
    return (e2e - ttft) / (num_output_tokens - 1) if num_output_tokens >= 2 else None


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (seconds in, seconds out); None for every key when empty."""
    if len(values) == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "count": 0}
    arr = np.asarray(values, dtype=np.float64)
    pct = np.percentile(arr, PERCENTILES)
    return {"mean": float(arr.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)},
            "count": int(arr.size)}


def meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not r.ok or r.ttft is None:
        return False
    if slo_ttft_ms is not None and r.ttft * 1e3 > slo_ttft_ms:
        return False
    t = r.tpot
    return slo_tpot_ms is None or t is None or t * 1e3 <= slo_tpot_ms


def latency_values(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    out: dict[str, list[float]] = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "token2": [r.token2 for r in ok if r.token2 is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [g for r in ok for g in r.itls],
        "e2e": [r.end for r in ok],
    }
    return out


def summarize(results: Sequence[RequestResult], duration: float, *,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict[str, Any]:
    """The run's summary (seconds everywhere, rates per second); see the module docstring."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = max(duration, 1e-9)
    out_tokens = sum(r.num_output_tokens for r in ok)
    in_tokens = sum(r.num_input_tokens for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(results), "completed": len(ok), "failed": len(failed),
        "errors": dict(Counter(r.error or "unknown" for r in failed).most_common(10)),
        "duration_s": duration, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "usage_reported": all(r.usage_reported for r in ok),
        "slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "goodput": None,
        "num_good": None,
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
        summary["num_good"], summary["goodput"] = good, good / duration
    for name, values in latency_values(results).items():
        summary[name] = stats(values)
    return summary


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def format_table(summary: dict[str, Any], title: str) -> str:
    """The printed report of one run."""
    s = summary
    w = 44
    lines = [f" {title} ".center(w + 36, "="),
             f"{'Successful requests:':<{w}}{s['completed']}",
             f"{'Failed requests:':<{w}}{s['failed']}"]
    lines += [f"  {n} x {err}" for err, n in s["errors"].items()]
    lines += [f"{'Benchmark duration (s):':<{w}}{s['duration_s']:.2f}",
              f"{'Total input tokens:':<{w}}{s['total_input_tokens']}",
              f"{'Total output tokens:':<{w}}{s['total_output_tokens']}"
              + ("" if s["usage_reported"] else "  (counted from chunks: no usage)"),
              f"{'Request throughput (req/s):':<{w}}{s['request_throughput']:.2f}",
              f"{'Output token throughput (tok/s):':<{w}}{s['output_throughput']:.1f}",
              f"{'Total token throughput (tok/s):':<{w}}{s['total_token_throughput']:.1f}"]
    if s["goodput"] is not None:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in (("TTFT", s["slo_ttft_ms"]),
                                                       ("TPOT", s["slo_tpot_ms"])) if v is not None)
        lines.append(f"{f'Goodput (req/s) [{slo}]:':<{w}}{s['goodput']:.2f}  "
                     f"({s['num_good']}/{s['completed']} met)")
    lines.append(f"{'latency (ms)':<{w - 20}}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"
                 f"{'n':>8}")
    for name in LATENCY_METRICS:
        st = s[name]
        lines.append(f"  {_LABELS[name]:<{w - 22}}" + "".join(
            f"{_fmt_ms(st[k]):>10}" for k in ("mean", "p50", "p90", "p99")) + f"{st['count']:>8}")
    lines.append("=" * (w + 36))
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------

def _pyplot():  # matplotlib is the optional `bench` extra
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MISSING_MATPLOTLIB = ("--plot-dir needs matplotlib: pip install 'pdserve[bench]' (the tables and "
                      "--result-json do not)")


def plot_cdfs(results: Sequence[RequestResult], path: Path, title: str) -> bool:
    """One PNG with the empirical CDF of each latency metric; False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    values = latency_values(results)
    fig, axes = plt.subplots(1, len(LATENCY_METRICS), figsize=(4 * len(LATENCY_METRICS), 3.4))
    for ax, name in zip(axes, LATENCY_METRICS):
        v = np.sort(np.asarray(values[name], dtype=np.float64)) * 1e3
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post")
        ax.set_title(_LABELS[name])
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of samples")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_rates(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Goodput (or request throughput without SLOs) and output tokens/s against the rate."""
    plt = _pyplot()
    if plt is None:
        return False
    rates = [r["request_rate"] for r in runs]
    finite = [x for x in rates if math.isfinite(x)]
    top = max(finite) * 1.25 if finite else 1.0
    xs = [x if math.isfinite(x) else top for x in rates]  # inf drawn at the right edge
    use_goodput = runs[0]["summary"]["goodput"] is not None
    ys = [r["summary"]["goodput" if use_goodput else "request_throughput"] for r in runs]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, ys, marker="o", label="goodput" if use_goodput else "request throughput")
    if use_goodput:
        ax.plot(xs, [r["summary"]["request_throughput"] for r in runs], marker="x", ls="--",
                label="request throughput")
    ax.set_xlabel("offered request rate (req/s; inf at the right)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
