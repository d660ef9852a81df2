"""Fit or check the step-time model (pdserve/plan/step_model.py: its docstring has the
form, the fits and their residuals).

    python bench/step_model.py fit bench/data/h200_llama3_8b_steps.json \\
        --out pdserve/plan/models/h200_llama3_8b.json
    python bench/step_model.py check bench/data/h100_llama3_8b_mixed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdserve.plan.step_model import (  # noqa: F401 - bench/fake_worker.py imports them here
    Point,
    StepModel,
    causal_pairs,
    check,
    describe,
    load,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit serving_gpu.py's JSON; print the fit, write --out")
    f.add_argument("measured", help="serving_gpu.json (bench/serving_gpu.py)")
    f.add_argument("--out", help="where to write the fitted model's JSON")
    c = sub.add_parser("check", help="fit the pure points of bench/mixed_steps.py's JSON (or "
                       "take --model) and print the model's residual on each mixed step")
    c.add_argument("measured", help="mixed_steps.json (bench/mixed_steps.py)")
    c.add_argument("--model", help="a fitted model's JSON to check instead of fitting")
    c.add_argument("--out", help="where to write the residuals (JSON)")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.measured).read_text())
    if args.cmd == "fit":
        model = StepModel.fit(data)
        print(describe(model, StepModel.points(data)))
        if args.out:
            Path(args.out).write_text(json.dumps(model.to_json(), indent=1) + "\n")
            print(f"wrote {args.out}")
        return
    model = load(args.model) if args.model else StepModel.fit(data)
    print(("model " + args.model if args.model else "fitted on the pure points") + ":")
    print(describe(model, StepModel.points(data)))
    rows = check(data, model)
    print(f"\n{'point':34s} {'measured':>10s} {'model':>10s} residual")
    for r in rows:
        print(f"{r['point']:34s} {r['measured_s'] * 1e3:7.2f} ms {r['model_s'] * 1e3:7.2f} ms "
              f"{100 * r['residual']:+7.1f}%")
    mixed = [abs(r["residual"]) for r in rows if r["n"]]
    if mixed:
        print(f"mixed steps: mean |residual| {100 * sum(mixed) / len(mixed):.1f}%, worst "
              f"{100 * max(mixed):.1f}% over {len(mixed)} points")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model.to_json(), "rows": rows},
                                             indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
