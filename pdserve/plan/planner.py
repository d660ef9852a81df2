"""`pdserve plan`: which layout of N GPUs serves a workload best under SLOs.

For each layout (k P + (N-k) D, N both-role workers at a chunk size, N both-role workers
under `--placement slo`: flexible roles) and each request rate, the cluster is simulated
(pdserve/plan/simulate.py: the step model of a measured GPU, the fake engines' scheduler,
the proxy's own routing code) on the requests `pdserve bench` would send (the same length
mix, seed and Poisson arrivals); each request's TTFT, inter-token gaps and TPOT are scored
against the SLOs. Goodput = the offered rate x the fraction of requests meeting every bound.
The recommended layout keeps >= `--attainment` of requests within the SLOs up to the
highest rate; a table per layout, JSON and an SVG plot (goodput vs rate) follow.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.common.options import option
from pdserve.config import build_config

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUILT_IN_MODELS = {"h200-llama3-8b": "h200_llama3_8b.json", "h100-llama3-8b": "h100_llama3_8b.json"}


def _pos(v: float | None) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def _nonneg(v: float | None) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


@dataclass(frozen=True)
class PlanConfig:
    """`pdserve plan`: the cluster size, the engine's measured costs, the workload, the SLOs."""

    gpus: int = option(2, check=_pos, help="GPUs to lay out (one worker per GPU).")
    step_model: str = option("h200-llama3-8b", metavar="NAME|PATH", help="The engine's step "
                             "times: a built-in fit (h200-llama3-8b, h100-llama3-8b: Llama-3-8B "
                             "shapes, bf16, measured on one GPU) or a fitted model's JSON "
                             "(python bench/step_model.py fit).")
    layouts: list[str] | None = option(None, metavar="LAYOUT", help="Layouts to compare "
                                       "(default: every kPmD with k+m = --gpus, both-256, "
                                       "both-512, both-2048 and flex-512). kPmD: k prefill + m "
                                       "decode workers; [N]both-B: both-role workers with "
                                       "B-token steps (B may be 2048m512: 512 while a stream "
                                       "decodes); [N]flex-B: the same under --placement slo; "
                                       "kPmD-slo: P/D under --placement slo.")
    workload: str | None = option(None, metavar="PATH", help="A length mix (pdserve bench "
                                  "--workload's JSON: \"pairs\" of [prompt, output] tokens); "
                                  "default: lognormal prompts of median --input-len, "
                                  "--output-len outputs.")
    input_len: int = option(512, check=_pos, help="Median prompt tokens (without --workload).")
    output_len: int = option(128, check=_pos, help="Output tokens (without --workload).")
    rates: list[float] | None = option(None, metavar="RATE", check=lambda v: None if all(
        x > 0 and math.isfinite(x) for x in v) else "each rate must be > 0", help="Request rates, req/s "
                                       "(default: 8 rates up to ~1.5x the estimated capacity).")
    window: float = option(30.0, check=_pos, help="Seconds of arrivals per rate: rate x window "
                           "requests (at least --num-prompts), so queues reach their steady "
                           "state.")
    num_prompts: int = option(80, check=_pos, help="The fewest requests a rate gets.")
    slo_ttft_ms: float = option(1000.0, check=_pos, help="SLO: time to first token at most this.")
    slo_itl_ms: float | None = option(25.0, check=_nonneg, help="SLO: each request's p99 gap "
                                      "between tokens at most this (0: no such bound).")
    slo_tpot_ms: float | None = option(None, check=_pos, help="SLO: time per output token "
                                       "after the first at most this.")
    attainment: float = option(0.9, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
                               help="A layout holds a rate while this fraction of its requests "
                               "meets the SLO.")
    max_num_batched_tokens: int = option(2048, check=_pos, help="A P's (and a D's) step budget.")
    transfer_gbps: float = option(20.0, check=_nonneg, help="P -> D KV copy rate, GB/s "
                                  "(0: instant).")
    time_scale: float = option(1.0, check=_pos, help="Every modelled time (steps, transfers, "
                               "SLOs) x this, as bench/placement_goodput.py runs its fakes.")
    seed: int = option(0, help="Seed of lengths and arrivals (pdserve bench's: same requests).")
    jobs: int = option(0, check=_nonneg, help="Processes simulating (0: one per core, at most 8).")
    out: str | None = option(None, metavar="DIR", help="Write plan.json and goodput.svg here.")


# ---- layouts --------------------------------------------------------------------------------

_PD = re.compile(r"^(\d+)p(\d+)d(-slo)?$")
_BOTH = re.compile(r"^(\d+)?(both|flex)-(\d+)(?:m(\d+))?(-loose)?$")


def parse_layout(name: str, gpus: int, slo: Any, loose: Any) -> Any:
    """A layout name (PlanConfig.layouts) as a Layout; ValueError when malformed or when its
    worker count is not `gpus`. `slo`/`loose`: the placement's bounds (proxy SLO), the second
    for names ending in -loose."""
    from pdserve.plan.simulate import Layout, WorkerSpec

    key = name.lower()
    if m := _PD.match(key):
        k, d = int(m[1]), int(m[2])
        if k < 1 or d < 1 or k + d != gpus:
            raise ValueError(f"layout {name!r}: {k} P + {d} D is not {gpus} GPUs of both roles")
        workers = (WorkerSpec("prefill"),) * k + (WorkerSpec("decode"),) * d
        return Layout(name, workers, "slo" if m[3] else "threshold", slo)
    if m := _BOTH.match(key):
        n = int(m[1]) if m[1] else gpus
        if n != gpus:
            raise ValueError(f"layout {name!r}: {n} workers on {gpus} GPUs")
        spec = WorkerSpec("both", int(m[3]), int(m[4]) if m[4] else None)
        flex = m[2] == "flex"
        if (m[5] and not flex) or int(m[3]) <= 0:
            raise ValueError(f"layout {name!r}: malformed (see --layouts)")
        return Layout(name, (spec,) * n, "slo" if flex else "threshold", loose if m[5] else slo)
    raise ValueError(f"layout {name!r}: not kPmD[-slo], [N]both-B[mM] or [N]flex-B[mM][-loose]")


def default_layouts(gpus: int) -> list[str]:
    pd = [f"{k}p{gpus - k}d" for k in range(1, gpus)]
    return [*pd, "both-256", "both-512", "both-2048", "flex-512"]


# ---- the workload and its score -------------------------------------------------------------

def requests_for(cfg: PlanConfig, rate: float) -> list[Any]:
    """The requests `pdserve bench --request-rate RATE` sends for this workload and seed (its
    first run's generator): lengths, then arrivals."""
    import numpy as np

    from pdserve.bench import BenchConfig, arrival_times, make_prompts
    from pdserve.plan.simulate import Request

    n = max(cfg.num_prompts, round(rate * cfg.window))
    bc = BenchConfig(num_prompts=n, workload=cfg.workload, input_len_dist="sharegpt",
                     input_len=cfg.input_len, output_len=cfg.output_len, seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0])
    prompts = make_prompts(bc, rng)
    arrivals = arrival_times(len(prompts), rate, rng)
    return [Request(t, length, out) for t, (_, length, out) in zip(arrivals, prompts)]


def p99_gap(itls: Sequence[float]) -> float:
    """A request's own p99 inter-token gap (0 with fewer than two tokens)."""
    s = sorted(itls)
    return s[min(len(s) - 1, int(0.99 * len(s)))] if s else 0.0


def meets(r: dict[str, Any], ttft_s: float, itl_s: float | None = None,
          tpot_s: float | None = None) -> bool:
    """Whether one request (`RequestResult.to_json()`) met every bound given (seconds)."""
    if not r["ok"] or r["ttft_s"] is None or r["ttft_s"] > ttft_s:
        return False
    if itl_s is not None and p99_gap(r["itl_s"]) > itl_s:
        return False
    return tpot_s is None or (r["tpot_s"] or 0.0) <= tpot_s


def goodput(requests: Sequence[dict[str, Any]], rate: float, ttft_s: float,
            itl_s: float | None = None, tpot_s: float | None = None) -> tuple[float, float]:
    """(goodput in req/s, fraction meeting): the offered rate times the fraction of requests
    meeting every bound (a run's own duration would count the drain of its longest
    answers)."""
    frac = sum(meets(r, ttft_s, itl_s, tpot_s) for r in requests) / max(1, len(requests))
    return rate * frac, frac


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def simulate_point(cfg: PlanConfig, layout_name: str, rate: float,
                   step_overhead_s: float = 0.0, picker_seed: int | None = None) -> dict[str, Any]:
    """One layout at one rate: goodput and latency percentiles (seconds, of the model's
    time: --time-scale included); `step_overhead_s`: Simulation's; `picker_seed`: the seed
    of the proxy's random choices (default --seed; the requests always come from --seed)."""
    from pdserve.plan.simulate import Simulation

    model = load_model(cfg.step_model)
    slo, loose = placement_bounds(cfg)
    layout = parse_layout(layout_name, cfg.gpus, slo, loose)
    layout = _with_budget(layout, cfg.max_num_batched_tokens)
    sim = Simulation(layout, model, transfer_gbps=cfg.transfer_gbps, time_scale=cfg.time_scale,
                     seed=cfg.seed if picker_seed is None else picker_seed,
                     step_overhead_s=step_overhead_s)
    results = [r.to_json() for r in sim.run(requests_for(cfg, rate))]
    s = cfg.time_scale
    good, frac = goodput(results, rate, cfg.slo_ttft_ms / 1e3 * s,
                         cfg.slo_itl_ms / 1e3 * s if cfg.slo_itl_ms else None,
                         cfg.slo_tpot_ms / 1e3 * s if cfg.slo_tpot_ms else None)
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in ok]
    itl = [g for r in ok for g in r["itl_s"]]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    return {"layout": layout_name, "rate": rate, "num_requests": len(results),
            "failed": len(results) - len(ok), "goodput": good, "attained": frac,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
            "tpot_p50_s": _pct(tpot, 50), "routes": dict(sim.routes), "requests": results}


def _with_budget(layout: Any, budget: int) -> Any:
    """P's and D's step budget from --max-num-batched-tokens (both-role ones keep their B)."""
    from dataclasses import replace

    return replace(layout, workers=tuple(
        replace(w, max_num_batched_tokens=budget) if w.role != "both" else w
        for w in layout.workers))


def placement_bounds(cfg: PlanConfig) -> tuple[Any, Any]:
    """The bounds `--placement slo` layouts steer by: the SLO's (the ITL bound, else TPOT),
    and for names ending in -loose, TTFT 2 s and 50 ms (the placement issue's loose SLO)."""
    from pdserve.proxy.placement import SLO

    s = cfg.time_scale
    itl = cfg.slo_itl_ms or cfg.slo_tpot_ms or 50.0
    return SLO(cfg.slo_ttft_ms / 1e3 * s, itl / 1e3 * s), SLO(2.0 * s, 0.050 * s)


def load_model(name: str) -> Any:
    from pdserve.plan.step_model import load

    path = MODELS_DIR / BUILT_IN_MODELS[name] if name in BUILT_IN_MODELS else Path(name)
    if not path.is_file():
        raise ValueError(f"--step-model {name}: no such file (built in: "
                         f"{', '.join(BUILT_IN_MODELS)})")
    try:
        return load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--step-model {name}: not a step model ({e})") from e


def default_rates(cfg: PlanConfig) -> list[float]:
    """8 rates up to ~1.5x a rough capacity: N GPUs each spending a request's prefill
    (its prompt at the compute-bound rate) plus its share of decode steps at batch 64."""
    import numpy as np

    from pdserve.bench import BenchConfig, make_prompts

    m = load_model(cfg.step_model).scaled(cfg.time_scale)
    bc = BenchConfig(num_prompts=500, workload=cfg.workload, input_len_dist="sharegpt",
                     input_len=cfg.input_len, output_len=cfg.output_len, seed=cfg.seed)
    sample = [(n, o) for _, n, o in make_prompts(bc, np.random.default_rng([cfg.seed, 0]))]
    mean_in = sum(n for n, _ in sample) / len(sample)
    mean_out = sum(o for _, o in sample) / len(sample)
    per_req = m.prefill_s(round(mean_in)) + mean_out * m.decode_s(64, mean_in + mean_out / 2) / 64
    cap = cfg.gpus / per_req
    step = _nice(cap * 1.5 / 8)
    return [step * i for i in range(1, 9)]


def _nice(x: float) -> float:
    """x rounded to 1, 2 or 5 times a power of ten."""
    e = 10 ** math.floor(math.log10(x))
    return min((1, 2, 5, 10), key=lambda f: abs(f * e - x)) * e


# ---- the report -----------------------------------------------------------------------------

def held_rate(rows: Sequence[dict[str, Any]], attainment: float) -> float:
    """The highest rate up to which every rate kept `attainment` (0: not even the lowest)."""
    held = 0.0
    for r in sorted(rows, key=lambda r: r["rate"]):
        if r["attained"] < attainment:
            break
        held = r["rate"]
    return held


def recommend(by_layout: dict[str, list[dict[str, Any]]], attainment: float) -> list[str]:
    """Layouts best first: the highest rate held, then the most goodput summed over rates."""
    return sorted(by_layout, key=lambda k: (-held_rate(by_layout[k], attainment),
                                            -sum(r["goodput"] for r in by_layout[k])))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"


def format_report(cfg: PlanConfig, by_layout: dict[str, list[dict[str, Any]]]) -> str:
    slo = [f"TTFT <= {cfg.slo_ttft_ms:g} ms"]
    if cfg.slo_itl_ms:
        slo.append(f"p99 gap <= {cfg.slo_itl_ms:g} ms")
    if cfg.slo_tpot_ms:
        slo.append(f"TPOT <= {cfg.slo_tpot_ms:g} ms")
    rates = sorted({r["rate"] for rows in by_layout.values() for r in rows})
    lines = [f"pdserve plan: {cfg.gpus} GPUs, step model {cfg.step_model}, SLO "
             f"{', '.join(slo)}; goodput in req/s (% of requests meeting the SLO)", "",
             "| layout | " + " | ".join(f"{r:g} req/s" for r in rates) + " | holds up to |",
             "|---|" + "---|" * (len(rates) + 1)]
    for name, rows in by_layout.items():
        cells = [f"{r['goodput']:.2f} ({r['attained']:.0%})" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {held_rate(rows, cfg.attainment):g} req/s |")
    lines += ["", "latency (ms): TTFT p50/p99, inter-token gap p50/p99, per rate:"]
    for name, rows in by_layout.items():
        cells = [f"{r['rate']:g}: {_ms(r['ttft_p50_s'])}/{_ms(r['ttft_p99_s'])}, "
                 f"{_ms(r['itl_p50_s'])}/{_ms(r['itl_p99_s'])}" for r in rows]
        lines.append(f"  {name:12s} " + "; ".join(cells))
    order = recommend(by_layout, cfg.attainment)
    best = order[0]
    held = held_rate(by_layout[best], cfg.attainment)
    lines.append("")
    if held == 0:
        lines.append(f"no layout keeps {cfg.attainment:.0%} of requests within the SLO at "
                     f"{rates[0]:g} req/s; the most goodput: {best}")
    else:
        lines.append(f"recommended: {best} (keeps {cfg.attainment:.0%} of requests within the "
                     f"SLO up to {held:g} req/s of those simulated)")
        if len(order) > 1:
            nxt = order[1]
            lines.append(f"next: {nxt} (up to {held_rate(by_layout[nxt], cfg.attainment):g} "
                         "req/s)")
    return "\n".join(lines)


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def goodput_svg(by_layout: dict[str, list[dict[str, Any]]], title: str) -> str:
    """Goodput vs offered rate, one line per layout, the offered rate dashed: plain SVG."""
    w, h, left, right, top, bottom = 640, 400, 60, 170, 30, 50
    rates = [r["rate"] for rows in by_layout.values() for r in rows]
    xmax = max(rates) * 1.05
    ymax = xmax
    pw, ph = w - left - right, h - top - bottom

    def x(v: float) -> float:
        return left + pw * v / xmax

    def y(v: float) -> float:
        return top + ph * (1 - v / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{left}" y="18" font-size="13">{_xml(title)}</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
           f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(xmax)}" y2="{y(xmax)}" stroke="#999" '
           'stroke-dasharray="4 4"/>']
    step = _nice(xmax / 5)
    for i in range(int(xmax / step) + 1):
        v = step * i
        out.append(f'<text x="{x(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{v:g}'
                   '</text>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 10}" text-anchor="middle">offered rate '
               '(req/s)</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
               'text-anchor="middle">goodput (req/s)</text>')
    for i, (name, rows) in enumerate(by_layout.items()):
        c = _COLORS[i % len(_COLORS)]
        pts = " ".join(f"{x(r['rate']):.1f},{y(r['goodput']):.1f}" for r in rows)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{x(r["rate"]):.1f}" cy="{y(r["goodput"]):.1f}" r="3" fill="{c}"/>'
                for r in rows]
        ly = top + 14 + 18 * i
        out.append(f'<line x1="{left + pw + 12}" y1="{ly - 4}" x2="{left + pw + 32}" '
                   f'y2="{ly - 4}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 38}" y="{ly}">{_xml(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---- the command ------------------------------------------------------------------------------

def _point(args: tuple[PlanConfig, str, float]) -> dict[str, Any]:
    return simulate_point(*args)


def plan(cfg: PlanConfig, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Every layout at every rate (in worker processes), rows per layout in rate order;
    each row without its per-request records."""
    slo, loose = placement_bounds(cfg)
    names = cfg.layouts or default_layouts(cfg.gpus)
    for name in names:
        parse_layout(name, cfg.gpus, slo, loose)  # a bad name fails before any work
    load_model(cfg.step_model)
    if cfg.workload:  # a bad file is one line before any simulation starts
        from pdserve.bench import load_workload

        load_workload(cfg.workload)
    rates = sorted(cfg.rates or default_rates(cfg))
    tasks = [(cfg, name, rate) for name in names for rate in rates]
    jobs = cfg.jobs or min(8, os.cpu_count() or 1)
    by_layout: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    t0 = time.monotonic()
    if jobs == 1:
        results = map(_point, tasks)
    else:
        pool = ProcessPoolExecutor(jobs)
        results = pool.map(_point, tasks)
    try:
        for k, row in enumerate(results, 1):
            row.pop("requests")
            by_layout[row["layout"]].append(row)
            if progress:
                print(f"\r  simulated {k}/{len(tasks)} ({time.monotonic() - t0:.0f} s)",
                      end="", file=sys.stderr, flush=True)
    finally:
        if jobs != 1:
            pool.shutdown(cancel_futures=True)
        if progress:
            print(file=sys.stderr)
    return by_layout


def run_plan(argv: Sequence[str]) -> int:
    cfg = build_config(PlanConfig, argv, prog="pdserve plan", description=(
        "Simulate a pdserve cluster of --gpus GPUs under each layout (P/D splits, both-role "
        "workers, placement over both-role workers) for a workload and SLOs, and recommend "
        "one. Step times come from a step model fitted on measured GPU steps; the proxy's own "
        "routing code places the requests. Seconds on a laptop; no GPU, no model."))
    by_layout = plan(cfg, progress=sys.stderr.isatty())  # a bad layout: ValueError, one line
    print(format_report(cfg, by_layout))
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"config": asdict(cfg), "layouts": by_layout,
               "recommended": recommend(by_layout, cfg.attainment)[0]}
        (out / "plan.json").write_text(json.dumps(doc, indent=1) + "\n")
        title = f"pdserve plan: {cfg.gpus} GPUs, {cfg.step_model}"
        (out / "goodput.svg").write_text(goodput_svg(by_layout, title))
        print(f"wrote {out / 'plan.json'} and {out / 'goodput.svg'}")
    return 0
