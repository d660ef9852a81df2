"""`pdserve plan`'s simulator against the fake-engine runs of bench/placement_goodput.py
(issue 22's consistency check: both run the same step model and scheduler, so the simulator
should reproduce the fakes' goodput; the test of its predictions is a GPU run).

    python bench/plan_check.py bench/data/placement_goodput/h100mixed_*.json \
        /tmp/pdserve-placement-goodput/*/summary.json --model h100-llama3-8b

Each argument is a layout's summary.json from placement_goodput.py (a layout name and one
row per rate, strict and loose attainment); several runs of one layout are averaged (their
spread is printed: the fakes' own run-to-run noise). For every point the simulator runs the
same layout, the same requests (the workload mix, seed 0, rate x --window of Poisson arrivals),
the same time scale (the summary's own `time_scale` and `window` where it records them, else
--time-scale and --window), and scores them with the same two SLOs (strict: TTFT <= 1 s and the
request's p99 gap <= 25 ms; loose: TTFT <= 2 s and TPOT <= 50 ms; x the time scale). The
model is named by --model, or by the file name's prefix (h200_ -> h200-llama3-8b, h100mixed_
-> h100-llama3-8b). The simulator adds the fakes' measured host time per step (their loop's:
placement_goodput.py records it) and averages --sim-seeds seeds of the proxy's random
choices. Prints fake vs simulated goodput per point, the difference as a fraction of the
offered rate (|sim - fakes' mean| / rate) and, where the fakes' goodput is at least
--relative-from of the rate, the relative difference; exits 1 if any point is off by more
than --tolerance of the offered rate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pdserve.plan.planner import PlanConfig, goodput, simulate_point

ROOT = Path(__file__).resolve().parents[1]
PREFIX_MODELS = {"h200_": "h200-llama3-8b", "h100mixed_": "h100-llama3-8b"}


def model_for(path: Path, given: str | None) -> str:
    if given:
        return given
    for prefix, model in PREFIX_MODELS.items():
        if path.name.startswith(prefix):
            return model
    raise SystemExit(f"{path}: name the step model (--model)")


def layout_workers(layout: str) -> int:
    """The workers (= GPUs) a layout name counts: kPmD -> k + m, Nboth-B / Nflex-B -> N, and
    2 where the name gives no count (the fakes' two-worker layouts)."""
    if m := re.match(r"^(\d+)p(\d+)d", layout):
        return int(m[1]) + int(m[2])
    if m := re.match(r"^(\d+)(both|flex)-", layout):
        return int(m[1])
    return 2


def check_point(job: tuple[str, str, float, float, float, float, int, argparse.Namespace]
                ) -> dict[str, Any]:
    """The simulated goodput of one point: the mean over --sim-seeds seeds of the proxy's
    random choices (the real proxy's are unseeded: each fake run draws its own)."""
    model, layout, s, rate, overhead_ms, window, num_prompts, args = job
    cfg = PlanConfig(gpus=layout_workers(layout), step_model=model, workload=args.workload, window=window,
                     num_prompts=num_prompts, time_scale=s, seed=0, jobs=1)
    strict, loose, each = 0.0, 0.0, []
    for seed in range(args.sim_seeds):
        row = simulate_point(cfg, layout, rate, overhead_ms / 1e3, picker_seed=seed)
        g_strict, _ = goodput(row["requests"], rate, 1.0 * s, itl_s=0.025 * s)
        g_loose, _ = goodput(row["requests"], rate, 2.0 * s, tpot_s=0.050 * s)
        strict += g_strict / args.sim_seeds
        loose += g_loose / args.sim_seeds
        each.append((g_strict, g_loose))
    return {"model": model, "layout": layout, "rate": rate, "sim_strict": strict,
            "sim_loose": loose, "sim_each": each, "routes": row["routes"]}


def step_overhead_ms(summaries: list[dict[str, Any]]) -> float:
    """The fakes' measured host time per step beyond the model: the mean over every fake of
    the summaries that recorded it (placement_goodput.py does since issue 22), weighted by
    steps; 0 if none did. One figure for all: it is a property of the box running them."""
    fakes = [f for d in summaries for f in (d.get("fakes") or {}).values()]
    steps = sum(f["steps"] for f in fakes)
    return sum(f["steps"] * f["step_overrun_ms"] for f in fakes) / steps if steps else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summaries", nargs="+", type=Path)
    ap.add_argument("--model", default=None, help="step model for every file (pdserve plan's "
                    "--step-model; default: by the file name's prefix)")
    ap.add_argument("--workload", default=str(ROOT / "bench" / "data" / "sharegpt_like.json"))
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--time-scale", type=float, default=4.0)
    ap.add_argument("--tolerance", type=float, default=0.15,
                    help="the largest |sim - fakes' mean| goodput allowed, as a fraction of "
                    "the rate")
    ap.add_argument("--relative-from", type=float, default=0.2)
    ap.add_argument("--sim-seeds", type=int, default=4,
                    help="simulations per point (seeds of the proxy's random choices), averaged")
    ap.add_argument("--step-overhead-ms", type=float, default=None,
                    help="host time per step beyond the model (default: the fakes' measured "
                    "mean where summaries have it, else 0)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = ap.parse_args(argv)
    docs = [json.loads(p.read_text()) for p in args.summaries]
    # a summary records its run's time scale and window (placement_goodput.py does since
    # session 10); older ones ran with the flags' defaults. Runs at one scale share the
    # fakes' measured host time per step: it depends on how hard the box was driven.
    scale_of = [float(d.get("time_scale", args.time_scale)) for d in docs]
    overheads = {s: args.step_overhead_ms if args.step_overhead_ms is not None else
                 step_overhead_ms([d for d, ds in zip(docs, scale_of) if ds == s])
                 for s in set(scale_of)}
    # every fake run of a point (model, layout, time scale, rate), from one file or several
    points: dict[tuple[str, str, float, float], list[tuple[dict[str, Any], str]]] = {}
    shape: dict[tuple[str, str, float, float], tuple[float, int]] = {}
    for path, data, s in zip(args.summaries, docs, scale_of):
        model = model_for(path, args.model)
        for r in data["rows"]:
            key = (model, data["layout"], s, float(r["rate"]))
            points.setdefault(key, []).append((r, f"{path.parent.name}/{path.name}"))
            shape[key] = (float(data.get("window", args.window)),
                          int(data.get("num_prompts", args.num_prompts)))
    keys = sorted(points)
    with ProcessPoolExecutor() as pool:
        sims = list(pool.map(check_point, [(m, lay, s, rate, overheads[s], *shape[m, lay, s, rate],
                                            args) for m, lay, s, rate in keys]))
    print("step overhead " + ", ".join(f"{v:.3f} ms at time scale {s:g}"
                                      for s, v in sorted(overheads.items()))
          + f" (the fakes' measured host time per step); the simulator's goodput is the mean "
          f"of {args.sim_seeds} seeds")
    print(f"{'model':15s} {'layout':16s} {'scale':>5s} {'rate':>5s}  strict: fakes -> mean | "
          "sim  loose: fakes -> mean | sim   |sim - mean| / rate (strict, loose)  fakes' spread")
    rows, worst = [], 0.0
    for (model, layout, scale, rate), sim in zip(keys, sims):
        runs = points[(model, layout, scale, rate)]
        out = {"model": model, "layout": layout, "time_scale": scale, "rate": rate, **sim,
               "files": [f for _, f in runs]}
        cells = []
        for k in ("strict", "loose"):
            vals = [r[f"goodput_{k}"] for r, _ in runs]
            mean = sum(vals) / len(vals)
            out[f"fake_{k}"], out[f"fake_{k}_mean"] = vals, mean
            out[f"diff_{k}"] = abs(sim[f"sim_{k}"] - mean) / rate
            out[f"spread_{k}"] = (max(vals) - min(vals)) / rate
            out[f"rel_{k}"] = abs(sim[f"sim_{k}"] / mean - 1) \
                if mean >= args.relative_from * rate else None
            cells.append(f"{'/'.join(f'{v:.2f}' for v in vals)} -> {mean:.2f} | "
                         f"{sim[f'sim_{k}']:.2f}")
            worst = max(worst, out[f"diff_{k}"])
        rows.append(out)
        spread = f"{out['spread_strict']:.1%}, {out['spread_loose']:.1%}" if len(runs) > 1 else "-"
        print(f"{model:15s} {layout:16s} {scale:5g} {rate:5g}  {cells[0]:28s} {cells[1]:28s} "
              f"{out['diff_strict']:.1%}, {out['diff_loose']:.1%}   {spread}")
    rel = [r[f"rel_{k}"] for r in rows for k in ("strict", "loose") if r[f"rel_{k}"] is not None]
    spreads = [r[f"spread_{k}"] for r in rows for k in ("strict", "loose") if len(r["files"]) > 1]
    print(f"\n{len(rows)} points: worst |sim - fakes' mean| {worst:.1%} of the rate "
          f"(tolerance {args.tolerance:.0%}); relative, where the fakes' goodput >= "
          f"{args.relative_from:.0%} of the rate: worst {max(rel, default=0):.1%}, mean "
          f"{sum(rel) / max(1, len(rel)):.1%} over {len(rel)}"
          + (f"; fake runs of one point differ by up to {max(spreads):.1%} of the rate"
             if spreads else ""))
    if args.out:
        args.out.write_text(json.dumps({"step_overhead_ms": {str(s): v for s, v in
                                                             overheads.items()},
                                        "rows": rows}, indent=1) + "\n")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
