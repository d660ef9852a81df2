"""Mixed engine steps on one GPU (issue 21): one prompt's prefill chunk and B decoding
sequences in one forward, Llama-3-8B shapes with dummy bf16 weights, timed at the
`engine.step()` level (scheduler, runner, sampler), with the pure points bench/serving_gpu.py
measures, on the same card in the same run, so bench/step_model.py can be fitted on the pure
points and checked on the mixed ones (`python bench/step_model.py check <this JSON>`).

- pure points, as serving_gpu.py measures them (its functions): prefill 8 x 1k and 1 x 8k at
  the runner level (median of 3), decode at batch 1, 32, 256 at the `engine.step()` level
  (`--steps` timed steps after 5 warm-up steps, contexts growing from `--ctx`);
- mixed points: for each B (1, 32, 128) B requests with `--ctx`-token prompts are prefilled and
  decoding; then for each n (256, 512, 1024, 2048) a request with a fresh random n-token prompt
  and max_tokens 1 is added before each step, so that step is exactly B decodes plus one
  n-token prefill chunk (the scheduler runs the running decodes first, then the waiting prompt
  within the 8192-token budget; prefix caching off), and the request finishes in it. Two
  warm-up steps, then `--reps` timed steps; the median, with the decodes' mean context at the
  timed steps. Between the n values, `--reps` pure decode steps at the same B and context
  (`decode_only`), for comparison. Every timed step's composition is checked (B + 1
  sequences, B + n tokens): a step the scheduler formed otherwise is reported, not timed.

Writes JSON (`mixed_steps.json` under --out) after every point. `--tiny --device cpu` runs the
tiny test model (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_gpu as sg  # noqa: E402 - the same shapes, rates and decode runs


def prefill_point(runner, bm, device, vocab: int, batch: int, length: int,
                  gen: torch.Generator) -> float:
    """serving_gpu.py's prefill measurement: runner.execute of `batch` prompts, median of 3."""
    from pdserve.engine.model_runner import SeqChunk

    prompts = [torch.randint(5, vocab - 1, (length,), generator=gen).tolist()
               for _ in range(batch)]
    tables = [bm.allocate(p, block_hashes=[]).block_table for p in prompts]
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    runner.execute(chunks)  # warm up
    sg.sync(device)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        runner.execute(chunks)
        sg.sync(device)
        times.append(time.perf_counter() - t0)
    for t in tables:
        bm.free(t)
    return statistics.median(times)


def mixed_points(engine, batch: int, ctx: int, ns: list[int], reps: int, vocab: int,
                 gen: torch.Generator) -> list[dict]:
    """B decoding requests; then per n: 2 warm-up + `reps` timed mixed steps, and `reps` pure
    decode steps. See the module docstring."""
    from pdserve import SamplingParams

    total = len(ns) * (3 * reps + 2) + 16
    sp = SamplingParams(temperature=0, max_tokens=total, ignore_eos=True)
    reqs = [engine.add_request(torch.randint(5, vocab - 1, (ctx,), generator=gen).tolist(), sp)
            for _ in range(batch)]
    while any(not r.seqs or not r.seqs[0].output_token_ids for r in reqs):
        engine.step()
    for _ in range(3):
        engine.step()
    sched = engine.scheduler
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out = []

    def contexts() -> list[int]:
        return [r.seqs[0].num_tokens for r in reqs]  # KV the next decode step reads

    for n in ns:
        times, ctxs, odd = [], [], 0
        for i in range(2 + reps):
            engine.add_request(torch.randint(5, vocab - 1, (n,), generator=gen).tolist(), one)
            c = statistics.fmean(contexts())
            formed = {}
            real = sched.schedule

            def spy(real=real, formed=formed):
                b = real()
                formed["seqs"], formed["tokens"] = len(b), sum(k for _, k in b)
                return b

            sched.schedule = spy
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            del sched.schedule
            if formed.get("seqs") != batch + 1 or formed.get("tokens") != batch + n:
                odd += 1
                continue
            if i >= 2:
                times.append(dt)
                ctxs.append(c)
        dec, dctx = [], []
        for _ in range(reps):
            dctx.append(statistics.fmean(contexts()))
            t0 = time.perf_counter()
            engine.step()
            dec.append(time.perf_counter() - t0)
        row = {"n": n, "batch": batch, "decode_ctx": statistics.fmean(ctxs) if ctxs else None,
               "seconds": statistics.median(times) if times else None, "samples": times,
               "misformed_steps": odd, "decode_only_seconds": statistics.median(dec),
               "decode_only_ctx": statistics.fmean(dctx)}
        out.append(row)
        print(f"  mixed B={batch:3d} n={n:5d}: {1e3 * (row['seconds'] or float('nan')):8.2f} ms "
              f"(decode alone {1e3 * row['decode_only_seconds']:.2f} ms, ctx "
              f"{row['decode_only_ctx']:.0f}; misformed {odd})", flush=True)
    for r in reqs:
        engine.abort(r)
    while engine.has_unfinished():
        engine.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test shapes (a smoke test)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100, help="timed steps of each pure decode run")
    ap.add_argument("--runs", type=int, default=1, help="pure decode runs per batch (median)")
    ap.add_argument("--batches", default="1,32,256", help="pure decode batches")
    ap.add_argument("--mixed-n", default="256,512,1024,2048")
    ap.add_argument("--mixed-b", default="1,32,128")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out) / "mixed_steps.json"
    model_cfg = sg.TINY if args.tiny else sg.LLAMA3_8B
    batches = [int(b) for b in args.batches.split(",")]
    mixed_b = [int(b) for b in args.mixed_b.split(",")]
    mixed_n = [int(n) for n in args.mixed_n.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                 "torch": torch.__version__, "steps": args.steps, "runs": args.runs,
                 "ctx": args.ctx, "shapes": "tiny" if args.tiny else "llama3-8b",
                 "level": "pure prefill: runner.execute; pure decode and mixed: engine.step()"}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    res["copy_TBps"] = sg.copy_rate(device, 1 << (28 if cuda else 22)) / 1e12
    res["matmul_TFLOPs"] = sg.matmul_rate(device, 8192 if cuda else 512) / 1e12
    save()
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.setup import build_engine

    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / "config.json").write_text(json.dumps(model_cfg))
    extra = {"gpu_memory_utilization": 0.9} if cuda else {"kv_cache_memory_bytes": 256 << 20}
    t0 = time.perf_counter()
    parts = build_engine(EngineConfig(model=str(cfg_dir), load_format="dummy", dtype="bfloat16",
                                      skip_tokenizer_init=True, device=args.device,
                                      max_model_len=min(8192, model_cfg["max_position_embeddings"]),
                                      max_num_seqs=max(batches + [b + 1 for b in mixed_b]),
                                      max_num_batched_tokens=8192,
                                      enable_prefix_caching=False, **extra), progress=False)
    res["build_s"] = time.perf_counter() - t0
    res["num_blocks"] = parts.block_manager.num_blocks
    nparams = sum(p.numel() for p in parts.model.parameters())
    res["params"] = nparams
    vocab = model_cfg["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    for name, batch, length in (("8x1k", 8, 1024), ("1x8k", 1, 8192)):
        length = min(length, parts.max_model_len - 1)
        dt = prefill_point(parts.runner, parts.block_manager, device, vocab, batch, length, gen)
        res[f"prefill_{name}"] = {"seconds": dt, "tokens_per_s": batch * length / dt}
        save()
    engine = LLMEngine(parts)
    sh = sg.shapes(model_cfg)
    for batch in batches:
        runs = [sg.decode_run(engine, batch, args.ctx, args.steps, seed=run, vocab=vocab)
                for run in range(args.runs)]
        step_ms = statistics.median(statistics.median(r) for r in runs) * 1e3
        mean_ctx = args.ctx + 1 + 5 + (args.steps - 1) / 2
        roof = sg.decode_roofline(sh, batch, mean_ctx, res["copy_TBps"] * 1e12,
                                  res["matmul_TFLOPs"] * 1e12)
        res[f"decode_b{batch}"] = {"step_ms": step_ms, **roof,
                                   "pct_of_roofline": roof["roofline_ms"] / step_ms}
        print(f"  decode b={batch}: {step_ms:.2f} ms/step ({100 * roof['roofline_ms'] / step_ms:.0f}% "
              "of roofline)", flush=True)
        save()
    res["mixed"] = []
    for batch in mixed_b:
        res["mixed"] += mixed_points(engine, batch, args.ctx, mixed_n, args.reps, vocab, gen)
        save()
    print(f"\n{res['device']}: copy {res['copy_TBps']:.2f} TB/s, matmul "
          f"{res['matmul_TFLOPs']:.0f} TFLOP/s; JSON {out}")
    print("| B | n | mixed step ms | decode alone ms | decode ctx |")
    print("|---|---|---|---|---|")
    for r in res["mixed"]:
        ms = f"{r['seconds'] * 1e3:.2f}" if r["seconds"] else "—"
        print(f"| {r['batch']} | {r['n']} | {ms} | {r['decode_only_seconds'] * 1e3:.2f} | "
              f"{r['decode_only_ctx']:.0f} |")


if __name__ == "__main__":
    main()
