"""Goodput of fixed layouts and of `--placement slo` on fake engines with GPU-like step times
(issue 21), on this machine's CPU: two workers per layout, the real proxy, `pdserve bench`.

    python bench/placement_goodput.py --rates 5 10 15 20 25 30 --window 20 \
        --layouts flex-512 2both-512 1p1d 2both-256 2both-1024 2both-2048

Layouts (each two fake engines of bench/fake_worker.py --step-model, by default the H200
Llama-3-8B fit in bench/data/ (`--model`: another fit, e.g. the H100 one with mixed-step
terms), every time stretched by --time-scale so a 2-core machine keeps up): 1p1d (the
prompt-length rule), 1p1d-slo and 1p1d-slo-loose (`--placement slo` with the strict or the
loose SLO's bounds), 2both-N (two both-role workers with N-token chunks: the collocated
baseline, tuned by taking the best N) and flex-N[-loose] (the same two under `--placement
slo`: flexible roles, each may prefill for the other); N may be "2048m512" (2,048-token
steps while no stream decodes, 512 when one does: --mixed-step-tokens). Workload: `pdserve bench --workload`
with the ShareGPT-like mix bench/data/sharegpt_like.json (or lognormal prompts of median
--input-len and --output-len tokens with --workload ''), Poisson arrivals, one run per rate
of rate x --window requests. SLOs, in unscaled milliseconds (scaled here): strict = TTFT
≤ 1 s and the request's own p99 inter-token gap ≤ 25 ms; loose = TTFT ≤ 2 s and TPOT ≤ 50
ms (the issue's definitions). Goodput = the offered rate × the fraction of requests meeting
the SLO. Writes JSON per layout under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from overload import free_port  # bench/ is this script's folder

from pdserve.plan.planner import goodput as plan_goodput

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "pdserve" / "plan" / "models" / "h200_llama3_8b.json"
TOKEN = "placement-goodput-token"


class Cluster:
    def __init__(self, out: Path, model: Path = MODEL):
        self.out, self.procs, self.model = out, [], model
        self.fakes: dict[str, str] = {}  # name -> URL
        self.env = {**os.environ, "PDSERVE_INTERNAL_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false"}

    def start(self, name: str, *cmd: str) -> None:
        log = open(self.out / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([sys.executable, *cmd], stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, cwd=ROOT))

    def fake(self, name: str, role: str, scale: float, budget: int,
             mixed: int | None = None) -> str:
        port = free_port(3)  # a fake binds port + 1 and names port + 2 as its KV address
        self.start(name, "bench/fake_worker.py", "--role", role, "--port", str(port),
                   "--step-model", str(self.model), "--time-scale", str(scale),
                   "--max-num-batched-tokens", str(budget), "--name", name,
                   *(["--mixed-step-tokens", str(mixed)] if mixed else []))
        self.fakes[name] = f"http://127.0.0.1:{port}"
        return self.fakes[name]

    def overruns(self) -> dict[str, dict[str, float]]:
        """Each fake's steps and their mean host time beyond the model (its load report)."""
        out = {}
        for name, url in self.fakes.items():
            load = httpx.get(url + "/load", timeout=10).json()
            out[name] = {"steps": load.get("fake_steps", 0),
                         "step_overrun_ms": load.get("fake_step_overrun_ms", 0.0)}
        return out

    def proxy(self, ready: str, *args: str) -> str:
        """Start the proxy; its URL once /health says it serves `ready`."""
        port = free_port()
        self.start("proxy", "-m", "pdserve", "serve", "--port", str(port), *args)
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200 and ready in str(r.json().get("serves", "")):
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError((self.out / "proxy.log").read_text()[-2000:])

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def goodput(requests: list[dict], rate: float, scale: float) -> dict[str, float]:
    """Requests/s meeting each SLO (scaled): the offered rate times the fraction that met it
    (pdserve/plan/planner.py's `goodput`, which `pdserve plan` scores with too)."""
    strict, strict_frac = plan_goodput(requests, rate, 1.0 * scale, itl_s=0.025 * scale)
    loose, loose_frac = plan_goodput(requests, rate, 2.0 * scale, tpot_s=0.050 * scale)
    return {"strict": strict, "loose": loose, "strict_frac": strict_frac,
            "loose_frac": loose_frac}


def run_layout(name: str, args: argparse.Namespace) -> dict:
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    c = Cluster(out, args.model)
    scale = args.time_scale
    try:
        if name.startswith("1p1d"):
            p = c.fake("P", "prefill", scale, 2048)
            d = c.fake("D", "decode", scale, 2048)
            slo = {"1p1d-slo": (1000, 25), "1p1d-slo-loose": (2000, 50)}.get(name)
            extra = ["--placement", "slo", "--slo-ttft-ms", str(slo[0] * scale),
                     "--slo-itl-ms", str(slo[1] * scale)] if slo else []
            url = c.proxy("1 P + 1 D", "--prefill", p, "--decode", d, *extra)
        else:  # 2both-N: two both-role workers, N-token chunks; flex-N[-loose]: the same
            # under --placement slo (flexible roles: they prefill for each other when it pays)
            # (N may be "2048m512": 2,048-token steps alone, 512 when a stream decodes)
            budget, _, mixed = name.split("-")[1].partition("m")
            a = c.fake("A", "both", scale, int(budget), int(mixed) if mixed else None)
            b = c.fake("B", "both", scale, int(budget), int(mixed) if mixed else None)
            slo = (2000, 50) if name.endswith("-loose") else (1000, 25)
            extra = ["--placement", "slo", "--slo-ttft-ms", str(slo[0] * scale),
                     "--slo-itl-ms", str(slo[1] * scale)] if name.startswith("flex") else []
            url = c.proxy("2 both-role", "--worker", a, "--worker", b, *extra)
        lengths = ["--workload", str(args.workload)] if args.workload else [
            "--input-len-dist", "sharegpt", "--input-len", str(args.input_len),
            "--output-len", str(args.output_len)]
        rows = []
        for rate in args.rates:  # one run per rate: its arrivals span --window seconds
            n = max(args.num_prompts, round(rate * args.window))
            result = out / f"bench-{rate:g}.json"
            cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", url, "--no-progress",
                   *lengths, "--num-prompts", str(n), "--seed", "0", "--result-json",
                   str(result), "--request-rate", str(rate)]
            r = subprocess.run(cmd, env=c.env, capture_output=True, text=True, cwd=ROOT)
            (out / f"bench-{rate:g}.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise RuntimeError(f"{name}: pdserve bench failed:\n"
                                   f"{(r.stdout + r.stderr)[-2000:]}")
            (run,) = json.loads(result.read_text())["runs"]
            g = goodput(run["requests"], rate, scale)
            rows.append({"rate": rate, "num_prompts": n, "goodput_strict": g["strict"],
                         "goodput_loose": g["loose"], "strict_frac": g["strict_frac"],
                         "loose_frac": g["loose_frac"]})
            print(f"  {name} @ {rate:g} req/s ({n} requests): strict {g['strict_frac']:.1%}, "
                  f"loose {g['loose_frac']:.1%}", flush=True)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        fakes = c.overruns()
    finally:
        c.stop()
    routes = [x for x in metrics.splitlines()
              if x.startswith(("pdserve_proxy_routing_decisions_total{",
                               "pdserve_proxy_placement_decisions_total{"))]
    data = {"layout": name, "rows": rows, "routes": routes, "fakes": fakes,
            "time_scale": scale, "window": args.window, "num_prompts": args.num_prompts,
            "model": str(args.model)}
    (out / "summary.json").write_text(json.dumps(data, indent=1))
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 8, 12, 16, 20],
                    help="request rates, req/s of scaled time (× --time-scale for the GPU's)")
    ap.add_argument("--num-prompts", type=int, default=80, help="the fewest requests a run has")
    ap.add_argument("--window", type=float, default=30.0,
                    help="seconds of arrivals per run: rate x window requests (at least "
                    "--num-prompts), so queues reach their steady state")
    ap.add_argument("--input-len", type=int, default=512, help="median prompt tokens")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--workload", default=str(ROOT / "bench" / "data" / "sharegpt_like.json"),
                    help="a length mix for pdserve bench --workload ('' : --input-len "
                    "lognormal prompts and --output-len)")
    ap.add_argument("--model", type=Path, default=MODEL,
                    help="the fakes' step model (bench/step_model.py's JSON; "
                    "pdserve/plan/models/h100_llama3_8b.json has the mixed-step terms)")
    ap.add_argument("--time-scale", type=float, default=4.0)
    ap.add_argument("--both-budgets", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--layouts", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pdserve-placement-goodput"))
    args = ap.parse_args(argv)
    layouts = args.layouts or ["1p1d", "1p1d-slo", "1p1d-slo-loose",
                               *(f"2both-{b}" for b in args.both_budgets)]
    results = []
    for name in layouts:
        t0 = time.monotonic()
        results.append(run_layout(name, args))
        print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\ngoodput (req/s of scaled time; × {args.time_scale:g} for the GPU's), "
          "strict / loose:")
    print("| layout | " + " | ".join(f"{r:g} req/s" for r in args.rates) + " |")
    print("|---|" + "---|" * len(args.rates))
    for res in results:
        cells = [f"{x['goodput_strict']:.2f} / {x['goodput_loose']:.2f}" for x in res["rows"]]
        print(f"| {res['layout']} | " + " | ".join(cells) + " |")
    for res in results:
        print(res["layout"], "; ".join(res["routes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
