"""Placement on the step-model simulator over several seeds (issue 21): the share of requests
meeting the strict and the loose SLO per layout, rate and seed, as `pdserve plan` simulates
them (the proxy's real routing; pdserve/plan/simulate.py), to see past one seed's luck.

    python bench/placement_seeds.py --layouts 1p1d flex-2048m512 --rates 13 26 39 52 58 64 \
        70 77 --seeds 0 1 2 3 4 --window 30

Strict: TTFT <= 1 s and the request's own p99 inter-token gap <= 25 ms; loose: TTFT <= 2 s
and TPOT <= 50 ms (every bound x --time-scale). Rates are of the model's time (GPU req/s
for a fit of GPU steps, / --time-scale for the fake engines' scaled runs). Prints a row per
layout and rate: strict% / loose% per seed, then the mean strict.
"""

from __future__ import annotations

import argparse
import itertools
from multiprocessing import Pool
from pathlib import Path

from pdserve.plan.planner import PlanConfig, meets, simulate_point

WORKLOAD = str(Path(__file__).resolve().parent / "data" / "sharegpt_like.json")


def point(job: tuple) -> tuple:
    layout, rate, seed, args = job
    s = args.time_scale
    cfg = PlanConfig(gpus=2, step_model=args.model, workload=WORKLOAD, window=args.window,
                     seed=seed, time_scale=s)
    reqs = simulate_point(cfg, layout, rate, step_overhead_s=args.step_overhead)["requests"]
    strict = sum(meets(r, 1.0 * s, 0.025 * s) for r in reqs) / len(reqs)
    loose = sum(meets(r, 2.0 * s, None, 0.050 * s) for r in reqs) / len(reqs)
    return layout, rate, seed, strict, loose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["1p1d", "flex-2048m512"])
    ap.add_argument("--rates", type=float, nargs="+", default=[13, 26, 39, 52, 58, 64, 70, 77])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--model", default="h200-llama3-8b")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--step-overhead", type=float, default=0.0,
                    help="host seconds added per step (the fakes' loop: ~0.00044)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    jobs = [(lay, rate, seed, args) for lay, rate, seed in
            itertools.product(args.layouts, args.rates, args.seeds)]
    with Pool(args.jobs) as pool:
        res = pool.map(point, jobs)
    print(f"strict% / loose% per seed {args.seeds}; {args.model}, window {args.window:g} s, "
          f"time scale {args.time_scale:g}")
    for lay in args.layouts:
        for rate in args.rates:
            rows = [r for r in res if r[0] == lay and r[1] == rate]
            cells = "  ".join(f"{r[3] * 100:5.1f}/{r[4] * 100:5.1f}" for r in rows)
            mean = sum(r[3] for r in rows) / len(rows) * 100
            print(f"{lay:16s} {rate:6g}  {cells}   mean strict {mean:5.1f}")


if __name__ == "__main__":
    main()
