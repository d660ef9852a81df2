"""lm-eval against `pdserve serve`: a loglikelihood task from a small local dataset file, run
twice by lm-eval itself, once through pdserve (`local-completions`: token-id prompts, echo,
logprobs 1, max_tokens 1) and once with transformers on the same checkpoint (lm-eval's `hf`
model); every document's loglikelihood must agree within 1e-4 (issue 20's Must-show).

lm-eval is not a pdserve dependency (it pulls datasets, evaluate, scikit-learn, ...): install
it in its own environment and name its `lm_eval` with --lm-eval, e.g.

    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 lm-eval
    .venv/bin/python bench/lm_eval_check.py --lm-eval /tmp/lmeval/bin/lm_eval

lm-eval's API models encode without special tokens unless add_bos_token=True, its `hf` model
with the tokenizer's default (a BOS first, for Llama tokenizers): the pdserve run passes
add_bos_token=True so both score the same token ids.

The server is a local 1 P + 1 D cluster (`pdserve serve`, the built-in model unless --model,
CPU); requests that end at their first token, as lm-eval's do, go to P alone. Writes the
dataset, the task, both runs' samples and a summary under --out; prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

TASK = "pdserve_loglikelihood"
WORDS = ("the cat dog sky river stone light night city road tree rain song bird house old "
         "new red blue green small large quiet bright slow fast far near home away").split()


def dataset(n: int, seed: int) -> list[dict[str, str]]:
    """Documents of random words: a context of 6-30 words and a continuation of 1-6."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
        cont = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        docs.append({"context": ctx.capitalize(), "continuation": cont})
    return docs


def write_task(out: Path, docs: list[dict[str, str]]) -> Path:
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return tasks


def start_server(model: str | None, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdserve", "serve", "--port", str(port), "--device", "cpu",
           "--max-model-len", "1024", "--min-pd-prompt-tokens", "0"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"pdserve serve not healthy in 180 s:\n{log.read_text()[-3000:]}")


def run_lm_eval(lm_eval: str, model_type: str, model_args: str, tasks: Path, out: Path,
                batch_size: int) -> list[dict]:
    """One lm-eval run; its samples (one per document, in document order)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [lm_eval, "--model", model_type, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(tasks), "--log_samples", "--output_path", str(out),
           "--batch_size", str(batch_size), "--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out / "lm_eval.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"lm_eval {model_type} failed ({r.returncode}):\n"
                           f"{(r.stdout + r.stderr)[-4000:]}")
    print(f"lm_eval --model {model_type}: {time.monotonic() - t0:.1f} s", flush=True)
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if not files:
        raise RuntimeError(f"no samples file under {out}")
    samples = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(samples, key=lambda s: s["doc_id"])


def loglik(sample: dict) -> tuple[float, bool]:
    resp = sample["filtered_resps"][0]
    return float(resp[0]), bool(resp[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command (its own venv)")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the built-in)")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pdserve-lm-eval"))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)

    from pdserve.engine.builtin_model import builtin_model_path

    model_path = args.model or str(builtin_model_path())
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = write_task(args.out, dataset(args.docs, seed=7))
    server = start_server(args.model, args.port, args.out / "pdserve.log")
    try:
        name = httpx.get(f"http://127.0.0.1:{args.port}/v1/models").json()["data"][0]["id"]
        ours = run_lm_eval(
            args.lm_eval, "local-completions",
            f"model={name},base_url=http://127.0.0.1:{args.port}/v1/completions,"
            f"tokenizer={model_path},tokenizer_backend=huggingface,add_bos_token=True,"
            "num_concurrent=2,"
            "max_retries=1", tasks, args.out / "pdserve", args.batch_size)
        metrics = httpx.get(f"http://127.0.0.1:{args.port}/metrics").text
    finally:
        server.terminate()
        server.wait(30)
    ref = run_lm_eval(args.lm_eval, "hf", f"pretrained={model_path},dtype=float32",
                      tasks, args.out / "transformers", args.batch_size)
    if len(ours) != len(ref):
        raise SystemExit(f"{len(ours)} samples through pdserve, {len(ref)} with transformers")
    diffs = [abs(loglik(a)[0] - loglik(b)[0]) for a, b in zip(ours, ref, strict=True)]
    greedy_same = sum(loglik(a)[1] == loglik(b)[1] for a, b in zip(ours, ref, strict=True))
    routes = [line for line in metrics.splitlines()
              if line.startswith("pdserve_proxy_routing_decisions_total{")]
    summary = {
        "documents": len(ours), "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs), "is_greedy_agree": greedy_same,
        "tolerance": args.tolerance, "routes": routes,
        "first": [{"doc": a["doc_id"], "pdserve": loglik(a)[0], "transformers": loglik(b)[0]}
                  for a, b in list(zip(ours, ref, strict=True))[:5]],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| doc | pdserve loglikelihood | transformers (lm-eval hf) | abs diff |")
    print("|---|---|---|---|")
    for a, b, d in list(zip(ours, ref, diffs, strict=True))[:8]:
        print(f"| {a['doc_id']} | {loglik(a)[0]:.6f} | {loglik(b)[0]:.6f} | {d:.1e} |")
    print(f"\n{len(ours)} documents: max |diff| {max(diffs):.2e}, mean {summary['mean_abs_diff']:.2e}"
          f" (tolerance {args.tolerance:g}); is_greedy agrees on {greedy_same}/{len(ours)}")
    print("routes:", "; ".join(routes))
    ok = max(diffs) <= args.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
