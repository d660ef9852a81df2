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

Real engines (issue 26): `--gpus 0,1` (or 0,1,2,3) runs each layout's workers as `pdserve
worker` processes, one per listed GPU, Llama-3-8B shapes with dummy bf16 weights and token-id
prompts (`--gpu-max-model-len`, default 8,192, holds the mix's longest prompt + output,
6,179 tokens, so clipping the mix to max_model_len - output_len removes nothing), at time
scale 1. Layout names then count workers: kPmD (k + m = GPUs: 1p1d, 1p3d, 2p2d, 3p1d),
[N]both-B and [N]flex-B[-loose] (N both-role workers, default one per GPU). With --plan
every point also gets `pdserve plan`'s prediction (its simulator on the same layout, rate,
requests and SLOs; --plan-model names the step model: a built-in fit or a JSON) and the
difference as a fraction of the offered rate; `--png DIR` draws goodput vs rate per SLO.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

    def gpu_model(self) -> Path:
        """The real engines' model directory: Llama-3-8B's config.json (dummy weights)."""
        model = self.out.parent / "llama-3-8b"
        if not (model / "config.json").exists():
            from serving_gpu import LLAMA3_8B  # bench/ is this script's folder

            model.mkdir(parents=True, exist_ok=True)
            (model / "config.json").write_text(json.dumps(LLAMA3_8B))
        return model

    def engine(self, name: str, role: str, gpu: str, budget: int, args: argparse.Namespace,
               mixed: int | None = None) -> str:
        """A real worker on GPU `gpu`: Llama-3-8B shapes, dummy bf16 weights (--gpus)."""
        model = self.gpu_model()
        port = free_port(3)  # HTTP, data path, KV
        self.start(name, "-m", "pdserve", "worker", "--role", role, "--port", str(port),
                   "--model", str(model), "--load-format", "dummy", "--dtype", "bfloat16",
                   "--skip-tokenizer-init", "--max-model-len", str(args.gpu_max_model_len),
                   "--kv-cache-memory-bytes", str(args.gpu_kv_bytes), "--device", gpu,
                   "--max-num-batched-tokens", str(budget),
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

    def proxy(self, ready: str, *args: str, timeout: float = 120.0) -> str:
        """Start the proxy; its URL once /health says it serves `ready`."""
        port = free_port()
        self.start("proxy", "-m", "pdserve", "serve", "--port", str(port), *args)
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + timeout
        log = self.out / "proxy.log"
        while time.monotonic() < end:
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200 and ready in str(r.json().get("serves", "")):
                    return url
            except httpx.HTTPError:
                pass
            # a worker the proxy refuses (another model, a bad token) never joins: say so now
            refused = [ln for ln in log.read_text().splitlines() if "refused:" in ln]
            if refused:
                raise RuntimeError(f"the proxy refused a worker: {refused[0]}")
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"exited before the proxy was ready: {dead[0]}")
            time.sleep(0.3)
        raise TimeoutError(log.read_text()[-2000:])

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

_PD = re.compile(r"^(\d+)p(\d+)d(-slo(?:-loose)?)?$")
_BOTH = re.compile(r"^(\d+)?(both|flex)-(\d+)(?:m(\d+))?(-loose)?$")


def start_layout(c: Cluster, name: str, args: argparse.Namespace) -> str:
    """Start layout `name`'s workers and proxy; the proxy's URL once it serves them.
    Fakes (no --gpus): 1p1d[-slo[-loose]], 2both-N, flex-N[-loose] (two workers). Real engines
    (--gpus): one worker per GPU, kPmD[-slo[-loose]] and [N]both-N / [N]flex-N[-loose]."""
    scale = args.time_scale
    gpus = args.gpu_list
    count = len(gpus) if gpus else 2

    def worker(wname: str, role: str, i: int, budget: int, mixed: int | None = None) -> str:
        if gpus:
            return c.engine(wname, role, gpus[i], budget, args, mixed)
        return c.fake(wname, role, scale, budget, mixed)

    def slo_args(loose: bool) -> list[str]:
        ttft, itl = (2000, 50) if loose else (1000, 25)
        return ["--placement", "slo", "--slo-ttft-ms", str(ttft * scale),
                "--slo-itl-ms", str(itl * scale)]

    ready_s = 1800.0 if gpus else 120.0  # real engines: weights, CUDA graphs, Triton compiles
    # the proxy serves the workers' model (it refuses workers of another), token ids only
    tokenless = ["--model", str(c.gpu_model()), "--skip-tokenizer-init"] if gpus else []
    if m := _PD.match(name):
        k, d = int(m[1]), int(m[2])
        if k + d != count:
            raise SystemExit(f"{name}: {k + d} workers, but {count} GPUs/workers here")
        urls = [arg for i in range(k)
                for arg in ("--prefill", worker(f"P{i}" if k > 1 else "P", "prefill", i, 2048))]
        urls += [arg for i in range(d)
                 for arg in ("--decode", worker(f"D{i}" if d > 1 else "D", "decode", k + i,
                                                2048))]
        extra = slo_args(m[3] == "-slo-loose") if m[3] else []
        return c.proxy(f"{k} P + {d} D", *urls, *tokenless, *extra, timeout=ready_s)
    if m := _BOTH.match(name):
        # N both-role workers with B-token chunks (B may be "2048m512": 2,048-token steps
        # alone, 512 when a stream decodes); flex: the same under --placement slo (flexible
        # roles: they prefill for each other when it pays)
        n = int(m[1] or count)
        if n != count:
            raise SystemExit(f"{name}: {n} workers, but {count} GPUs/workers here")
        budget, mixed = int(m[3]), int(m[4]) if m[4] else None
        urls = [arg for i in range(n) for arg in
                ("--worker", worker(chr(ord("A") + i), "both", i, budget, mixed))]
        extra = slo_args(bool(m[5])) if m[2] == "flex" else []
        return c.proxy(f"{n} both-role", *urls, *tokenless, *extra, timeout=ready_s)
    raise SystemExit(f"unknown layout {name!r}")


def predict(name: str, rows: list[dict], args: argparse.Namespace) -> None:
    """`pdserve plan`'s goodput at each measured point (its simulator: same layout, rate,
    requests, SLOs and time scale; the mean over --sim-seeds seeds of the proxy's random
    choices), into each row with the error as a fraction of the offered rate."""
    from plan_check import check_point  # bench/ is this script's folder

    for row in rows:
        sim = check_point((args.plan_model, name, args.time_scale, row["rate"], 0.0,
                           args.window, args.num_prompts, args))
        row["plan_strict"], row["plan_loose"] = sim["sim_strict"], sim["sim_loose"]
        for slo in ("strict", "loose"):
            row[f"plan_error_{slo}"] = abs(sim[f"sim_{slo}"] - row[f"goodput_{slo}"]) / row["rate"]
        print(f"  {name} @ {row['rate']:g}: plan strict {sim['sim_strict']:.2f} (measured "
              f"{row['goodput_strict']:.2f}), loose {sim['sim_loose']:.2f} (measured "
              f"{row['goodput_loose']:.2f})", flush=True)


def write_svgs(results: list[dict], out: Path, title: str) -> None:
    """goodput_strict.svg and goodput_loose.svg: measured lines per layout (and with --plan
    the plan's predictions, dashed names "... (plan)")."""
    from pdserve.plan.planner import goodput_svg

    out.mkdir(parents=True, exist_ok=True)
    for slo in ("strict", "loose"):
        lines: dict[str, list[dict]] = {}
        for res in results:
            lines[res["layout"]] = [{"rate": r["rate"], "goodput": r[f"goodput_{slo}"]}
                                    for r in res["rows"]]
            if res["rows"] and f"plan_{slo}" in res["rows"][0]:
                lines[res["layout"] + " (plan)"] = [
                    {"rate": r["rate"], "goodput": r[f"plan_{slo}"]} for r in res["rows"]]
        if any(lines.values()):
            (out / f"goodput_{slo}.svg").write_text(goodput_svg(lines, f"{title}, {slo} SLO"))


def run_layout(name: str, args: argparse.Namespace) -> dict:
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    c = Cluster(out, args.model)
    scale = args.time_scale
    try:
        url = start_layout(c, name, args)
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
        if args.plan:
            predict(name, rows, args)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        fakes = c.overruns()
    finally:
        c.stop()
    routes = [x for x in metrics.splitlines()
              if x.startswith(("pdserve_proxy_routing_decisions_total{",
                               "pdserve_proxy_placement_decisions_total{"))]
    data = {"layout": name, "rows": rows, "routes": routes, "fakes": fakes,
            "time_scale": scale, "window": args.window, "num_prompts": args.num_prompts,
            "model": str(args.model), "gpus": args.gpu_list or None,
            "plan_model": args.plan_model if args.plan else None}
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
    ap.add_argument("--gpus", default="", help="real engines, one worker per GPU (e.g. 0,1): "
                    "Llama-3-8B shapes, dummy bf16 weights; the time scale is then 1")
    ap.add_argument("--gpu-kv-bytes", type=int, default=16 << 30, help="each real worker's KV")
    ap.add_argument("--gpu-max-model-len", type=int, default=8192)
    ap.add_argument("--plan", action="store_true", help="pdserve plan's prediction per point")
    ap.add_argument("--plan-model", default="h200-llama3-8b",
                    help="the plan's step model: a built-in fit or a fitted model's JSON")
    ap.add_argument("--sim-seeds", type=int, default=4, help="--plan: seeds averaged")
    args = ap.parse_args(argv)
    args.gpu_list = [g for g in args.gpus.split(",") if g]
    if args.gpu_list:
        args.time_scale = 1.0
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
    if args.plan:
        print("\npdserve plan's prediction, strict / loose (error: |plan - measured| / rate):")
        for res in results:
            for x in res["rows"]:
                print(f"| {res['layout']} | {x['rate']:g} | {x['plan_strict']:.2f} / "
                      f"{x['plan_loose']:.2f} | {x['plan_error_strict']:.1%} / "
                      f"{x['plan_error_loose']:.1%} |")
    write_svgs(results, args.out, "placement goodput" + (f", GPUs {args.gpus}" if args.gpus
                                                          else ", fake engines"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
