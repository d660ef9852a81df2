"""`pdserve plan`'s simulator against the fake-engine runs of bench/placement_goodput.py
(issue 22's consistency check: both run the same step model and scheduler, so the simulator
should reproduce the fakes' goodput; the test of its predictions is a GPU run).

    python bench/plan_check.py bench/data/placement_goodput/h100mixed_*.json \
        /tmp/pdserve-placement-goodput/*/summary.json --model h100-llama3-8b

Each argument is a layout's summary.json from placement_goodput.py (a layout name and one
row per rate, strict and loose attainment). For every row the simulator runs the same
layout, the same requests (the workload mix, seed 0, rate x --window of Poisson arrivals),
the same time scale, and scores them with the same two SLOs (strict: TTFT <= 1 s and the
request's p99 gap <= 25 ms; loose: TTFT <= 2 s and TPOT <= 50 ms; x the time scale). The
model is named by --model, or by the file name's prefix (h200_ -> h200-llama3-8b, h100mixed_
-> h100-llama3-8b). Prints fake vs simulated goodput per point, the difference in points of
the offered rate (|sim - fake| / rate) and, where the fakes' goodput is at least
--relative-from of the rate, the relative difference; exits 1 if any point is off by more
than --tolerance of the offered rate.
"""

from __future__ import annotations

import argparse
import json
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


def check_point(job: tuple[str, str, float, float, argparse.Namespace]) -> dict[str, Any]:
    model, layout, rate, overhead_ms, args = job
    cfg = PlanConfig(gpus=2, step_model=model, workload=args.workload, window=args.window,
                     num_prompts=args.num_prompts, time_scale=args.time_scale, seed=0, jobs=1)
    row = simulate_point(cfg, layout, rate, overhead_ms / 1e3)
    s = args.time_scale
    strict, _ = goodput(row["requests"], rate, 1.0 * s, itl_s=0.025 * s)
    loose, _ = goodput(row["requests"], rate, 2.0 * s, tpot_s=0.050 * s)
    return {"model": model, "layout": layout, "rate": rate, "sim_strict": strict,
            "sim_loose": loose, "routes": row["routes"]}


def step_overhead_ms(data: dict[str, Any], given: float | None) -> float:
    """--step-overhead-ms, else the fakes' measured mean (weighted by steps; the summaries of
    placement_goodput.py since it records it), else 0."""
    if given is not None:
        return given
    fakes = data.get("fakes") or {}
    steps = sum(f["steps"] for f in fakes.values())
    return sum(f["steps"] * f["step_overrun_ms"] for f in fakes.values()) / steps if steps else 0.0


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
                    help="the largest |sim - fake| goodput allowed, as a fraction of the rate")
    ap.add_argument("--relative-from", type=float, default=0.2)
    ap.add_argument("--step-overhead-ms", type=float, default=None,
                    help="host time per step beyond the model, for every file (default: the "
                    "fakes' measured mean where the summary has it, else 0)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = ap.parse_args(argv)
    fakes, overheads = [], {}
    for path in args.summaries:
        data = json.loads(path.read_text())
        model = model_for(path, args.model)
        overheads[path.name] = step_overhead_ms(data, args.step_overhead_ms)
        for r in data["rows"]:
            fakes.append(((model, data["layout"], float(r["rate"])), r, path.name))
    jobs = [(m, lay, rate, overheads[name], args) for (m, lay, rate), _, name in fakes]
    with ProcessPoolExecutor() as pool:
        sims = list(pool.map(check_point, jobs))
    rows, worst = [], 0.0
    for name, ms in overheads.items():
        print(f"{name}: step overhead {ms:.3f} ms")
    print(f"{'file':34s} {'rate':>5s}   strict fake/sim   loose fake/sim   |diff|/rate")
    for ((_, _, rate), fake, name), sim in zip(fakes, sims):
        d_strict = abs(sim["sim_strict"] - fake["goodput_strict"]) / rate
        d_loose = abs(sim["sim_loose"] - fake["goodput_loose"]) / rate
        rel = [abs(sim[f"sim_{k}"] / fake[f"goodput_{k}"] - 1) for k in ("strict", "loose")
               if fake[f"goodput_{k}"] >= args.relative_from * rate]
        worst = max(worst, d_strict, d_loose)
        rows.append({**sim, "file": name, "fake_strict": fake["goodput_strict"],
                     "fake_loose": fake["goodput_loose"], "diff_strict": d_strict,
                     "diff_loose": d_loose, "relative": rel})
        print(f"{name:34s} {rate:5g}   {fake['goodput_strict']:6.2f} {sim['sim_strict']:6.2f}"
              f"     {fake['goodput_loose']:6.2f} {sim['sim_loose']:6.2f}     "
              f"{d_strict:.1%} / {d_loose:.1%}"
              + (f"   rel {max(rel):.1%}" if rel else ""))
    rel_all = [x for r in rows for x in r["relative"]]
    print(f"\n{len(rows)} points: worst |sim - fake| {worst:.1%} of the rate (tolerance "
          f"{args.tolerance:.0%}); relative, where the fakes' goodput >= "
          f"{args.relative_from:.0%} of the rate: worst {max(rel_all, default=0):.1%}, mean "
          f"{sum(rel_all) / max(1, len(rel_all)):.1%} over {len(rel_all)}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
