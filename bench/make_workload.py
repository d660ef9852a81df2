"""Write a ShareGPT-like length mix for `pdserve bench --workload` (issue 21's workload).

    python bench/make_workload.py --out bench/data/sharegpt_like.json

Synthetic, generated here (these machines reach no dataset hub): conversational traffic as
ShareGPT-style benchmarks show it, a heavy-tailed prompt length (a chat's history grows
with its turns) and a shorter, less skewed answer length, drawn independently:

- prompt tokens: round(LogNormal(ln 400, 1.0)) clipped to [16, 6000] (median 400, mean ~650)
- output tokens: round(LogNormal(ln 160, 0.9)) clipped to [8, 1500] (median 160, mean ~235)

The committed file is this script's output with the defaults (seed 0, 2,000 pairs); the
file records the parameters it was made with.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def pairs(n: int, seed: int, prompt: tuple[float, float, int, int],
          output: tuple[float, float, int, int]) -> list[list[int]]:
    rng = random.Random(seed)

    def draw(median: float, sigma: float, lo: int, hi: int) -> int:
        return int(min(max(round(rng.lognormvariate(math.log(median), sigma)), lo), hi))

    return [[draw(*prompt), draw(*output)] for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/data/sharegpt_like.json"))
    ap.add_argument("--num-pairs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prompt, output = (400.0, 1.0, 16, 6000), (160.0, 0.9, 8, 1500)
    ps = pairs(args.num_pairs, args.seed, prompt, output)
    mean = [sum(p[i] for p in ps) / len(ps) for i in (0, 1)]
    doc = {"description": "ShareGPT-like prompt/output token lengths (synthetic, "
                          "bench/make_workload.py)",
           "prompt": {"lognormal_median": prompt[0], "sigma": prompt[1], "clip": prompt[2:]},
           "output": {"lognormal_median": output[0], "sigma": output[1], "clip": output[2:]},
           "seed": args.seed, "mean_prompt_tokens": round(mean[0], 1),
           "mean_output_tokens": round(mean[1], 1), "pairs": ps}
    args.out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(ps)} pairs, mean prompt {mean[0]:.0f}, mean output {mean[1]:.0f}")


if __name__ == "__main__":
    main()
