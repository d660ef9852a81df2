"""The engine on one GPU as it serves, Llama-3-8B shapes with dummy bf16 weights (issue 16):

- decode: B requests with 1k-token prompts (B = 1, 32, 256), then `--steps` (100)
  `engine.step()` calls after 5 warm-up steps: scheduler, runner (CUDA graphs) and sampler,
  contexts growing from 1k; the median step time of `--runs` (3) runs. Roofline per step =
  the GEMM phase at max(weight bytes / copy rate, GEMM FLOPs / matmul rate) plus the KV bytes
  read / copy rate; weight bytes count the batch's embedding rows only, not the table; the
  rates are measured in the same run (copy: read + write bytes/s, at which streaming reads go);
- a per-kernel profile of one decode step per batch (torch.profiler, CUDA time by kernel);
- prefill tokens/s for 8 x 1k and 1 x 8k prompts (runner level) against the matmul roofline:
  2 * params * tokens + causal attention FLOPs over the same-run matmul rate;
- transformers' `generate` on the same shapes and dummy weights, batch 1 and 32 (sdpa; per
  step = (time for 1 + N new tokens - time for 1) / N), in the same run.

`--tensor-parallel-size N` (issue 27): the engine over N GPUs (one process per rank, NCCL);
the rooflines then take N GPUs' copy and matmul rates (each rank reads 1/N of the weights and
KV and does 1/N of the FLOPs) plus the step's all-reduces (two per layer, of [rows, hidden]
bf16) at their time measured in the same run by N processes of their own
(`allreduce_ms`: the median of back-to-back calls, CUDA events on rank 0).

Writes JSON (`serving_gpu.json` under --out) after every point; prints a table last. Never
asserts. `--tiny` runs the tiny test model on whatever device is given (a smoke test: CPU in
CI), with fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 128000,
    "eos_token_id": 128001,
}
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 1}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rate(device: torch.device, numel: int) -> float:
    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 2 * 20 / (time.perf_counter() - t0)  # read + write bytes/s


def matmul_rate(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def shapes(cfg: dict) -> dict[str, int]:
    """Byte and FLOP counts of one decode token: GEMM weights (no embedding), per-token KV."""
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kvh = cfg["num_key_value_heads"]
    per_layer = h * (h + 2 * kvh * hd) + h * h + 2 * h * inter + inter * h
    gemm_params = L * per_layer + cfg["vocab_size"] * h  # layers + LM head
    return {"gemm_params": gemm_params, "hidden": h, "layers": L,
            "kv_bytes_per_token": L * 2 * kvh * hd * 2, "norm_params": (2 * L + 1) * h}


def decode_roofline(sh: dict, batch: int, mean_ctx: float, copy_bps: float,
                    matmul_fps: float, tp: int = 1, allreduce_ms: float = 0.0
                    ) -> dict[str, float]:
    """One decode step's floor on one GPU, or on `tp` GPUs (each rank: 1/tp of the GEMM
    weights, FLOPs and KV; norms and the batch's embedding rows whole) plus `allreduce_ms`,
    the step's all-reduces at their measured time."""
    weight_bytes = 2 * (sh["gemm_params"] / tp + sh["norm_params"] + batch * sh["hidden"])
    gemm_s = max(weight_bytes / copy_bps, 2 * batch * sh["gemm_params"] / tp / matmul_fps)
    kv_s = batch * mean_ctx * sh["kv_bytes_per_token"] / tp / copy_bps
    return {"gemm_ms": gemm_s * 1e3, "kv_ms": kv_s * 1e3, "allreduce_ms": allreduce_ms,
            "roofline_ms": (gemm_s + kv_s) * 1e3 + allreduce_ms}


def ar_note(r: dict) -> str:
    return f" + all-reduce {r['allreduce_ms']:.2f}" if r.get("allreduce_ms") else ""


def _allreduce_rank(rank: int, size: int, port: int, rows: list[int], hidden: int, calls: int,
                    backend: str, out) -> None:
    import torch.distributed as dist

    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        res = {}
        for n in rows:
            x = torch.ones(n, hidden, dtype=torch.bfloat16, device=dev)
            for _ in range(5):
                dist.all_reduce(x)
            times = []
            for _ in range(5):
                sync(dev)
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(calls):
                    dist.all_reduce(x)
                sync(dev)
                times.append((time.perf_counter() - t0) / calls)
            res[n] = statistics.median(times) * 1e3
        if rank == 0:
            out.put(res)
    finally:
        dist.destroy_process_group()


def allreduce_ms(size: int, rows: list[int], hidden: int, cuda: bool, calls: int = 64
                 ) -> dict[int, float]:
    """ms per all-reduce of [n, hidden] bf16 over `size` processes (NCCL on GPUs 0..size-1,
    gloo on CPU), for each n of `rows`: back-to-back calls, as a step's layers issue them."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, size, port, rows, hidden, calls,
                                                       "nccl" if cuda else "gloo", q))
             for r in range(size)]
    for pr in procs:
        pr.start()
    try:
        return q.get(timeout=300)
    finally:
        for pr in procs:
            pr.join(60)
            if pr.is_alive():
                pr.kill()


def decode_run(engine, batch: int, ctx: int, steps: int, seed: int, vocab: int) -> list[float]:
    """One run: `batch` requests, prefilled, 5 warm-up steps, then `steps` timed steps."""
    from pdserve import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    sp = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    reqs = [engine.add_request(torch.randint(5, vocab - 1, (ctx,), generator=gen).tolist(), sp)
            for _ in range(batch)]
    while any(not r.seqs or not r.seqs[0].output_token_ids for r in reqs):
        engine.step()  # the prefills (chunked), and the first tokens
    for _ in range(5):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()  # returns after the sampled tokens reached the host: synchronous
        times.append(time.perf_counter() - t0)
    for r in reqs:
        engine.abort(r)
    while engine.has_unfinished():
        engine.step()
    return times


def profile_step(engine, batch: int, ctx: int, vocab: int, device: torch.device) -> dict:
    """CUDA time by kernel over 5 decode steps at `batch`, per step: the top 12 kernels, the
    sum over every kernel (GPU busy time) and the steps' wall time, so wall - busy is what the
    GPU waited for the host."""
    from torch.profiler import ProfilerActivity, profile

    from pdserve import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reqs = [engine.add_request(list(range(5, 5 + ctx)), sp) for _ in range(batch)]
    while any(not r.seqs or not r.seqs[0].output_token_ids for r in reqs):
        engine.step()
    for _ in range(3):
        engine.step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(5):
            engine.step()
        sync(device)
        wall = (time.perf_counter() - t0) / 5
    phases = host_phases(engine, device)
    for r in reqs:
        engine.abort(r)
    while engine.has_unfinished():
        engine.step()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "us_per_step": t / 5, "calls_per_step": e.count / 5})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"top": rows[:12], "gpu_us_per_step": sum(r["us_per_step"] for r in rows),
            "kernels_per_step": sum(r["calls_per_step"] for r in rows),
            "wall_us_per_step": wall * 1e6, "host_phases_us": phases}


def host_phases(engine, device: torch.device, steps: int = 5) -> dict[str, float]:
    """Host time per step in each phase of `engine.step()` (no sync added): schedule, the
    runner's launch (graph replay, LM head), the sampler (its wait for the GPU included, in
    a synchronous step), postprocess; `other` = the step's wall time minus those (in an
    asynchronous step the wait for the previous step's tokens is there)."""
    sched, runner, sampler = engine.scheduler, engine.parts.runner, engine.parts.sampler
    acc = {"schedule": 0.0, "runner": 0.0, "sampler": 0.0, "postprocess": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t0
        return wrapper

    class TimedSampler:  # the engine calls the sampler and its `draw`
        __call__ = staticmethod(timed("sampler", sampler))
        draw = staticmethod(timed("sampler", sampler.draw))

    sched.schedule = timed("schedule", sched.schedule)
    runner.execute = timed("runner", runner.execute)
    sched.postprocess = timed("postprocess", sched.postprocess)
    engine.parts.sampler = TimedSampler()
    try:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    finally:
        del sched.schedule, runner.execute, sched.postprocess  # the instance overrides
        engine.parts.sampler = sampler
    out = {k: v / steps * 1e6 for k, v in acc.items()}
    out["other"] = wall / steps * 1e6 - sum(out.values())
    return out


def transformers_decode(cfg_dir: Path, batch: int, ctx: int, steps: int,
                        device: torch.device) -> float:
    """transformers' generate, per decode step (ms), same shapes, dummy weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    ids = torch.randint(5, config.vocab_size - 1, (batch, ctx), device=device)

    def gen(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    gen(2)  # warm up
    one = statistics.median(gen(1) for _ in range(3))
    full = statistics.median(gen(1 + steps) for _ in range(2))
    return (full - one) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test shapes (a smoke test)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-prefill", action="store_true", help="decode steps only")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="ranks (GPUs --device.. on): the engine sharded over them")
    ap.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default",
                    help="torch's BLAS back end for the GEMMs (preferred_blas_library)")
    ap.add_argument("--skinny-max-rows", type=int, default=None,
                    help="decode linears of up to this many rows through the fused split-K "
                    "kernel (kernels/gemv.py SKINNY_MAX_ROWS; default: its value; this "
                    "process only, so tp 1)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out) / "serving_gpu.json"
    model_cfg = TINY if args.tiny else LLAMA3_8B
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                     "torch": torch.__version__, "steps": args.steps, "runs": args.runs,
                     "ctx": args.ctx, "shapes": "tiny" if args.tiny else "llama3-8b",
                     "tensor_parallel_size": args.tensor_parallel_size}
    tp = args.tensor_parallel_size

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    results["blas"] = args.blas
    from pdserve.kernels import gemv

    if args.skinny_max_rows is not None:
        gemv.SKINNY_MAX_ROWS = args.skinny_max_rows
    results["skinny_max_rows"] = gemv.SKINNY_MAX_ROWS
    results["copy_TBps"] = copy_rate(device, 1 << (28 if cuda else 22)) / 1e12
    results["matmul_TFLOPs"] = matmul_rate(device, 8192 if cuda else 512) / 1e12
    save()
    ar = {n: 0.0 for n in (*batches, 8192)}
    if tp > 1:  # the all-reduces' own time, before the engine's ranks hold the GPUs
        ar = allreduce_ms(tp, sorted({*batches, 8192}), model_cfg["hidden_size"], cuda)
        results["allreduce_ms"] = {str(k): v for k, v in ar.items()}
        save()
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.model_runner import SeqChunk
    from pdserve.engine.setup import build_engine

    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / "config.json").write_text(json.dumps(model_cfg))
    t0 = time.perf_counter()
    extra = {"gpu_memory_utilization": 0.9} if cuda else {"kv_cache_memory_bytes": 256 << 20}
    parts = build_engine(EngineConfig(model=str(cfg_dir), load_format="dummy", dtype="bfloat16",
                                      skip_tokenizer_init=True, device=args.device,
                                      max_model_len=min(8192, model_cfg["max_position_embeddings"]),
                                      max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                      enable_prefix_caching=False,
                                      tensor_parallel_size=tp, **extra), progress=False)
    results["build_s"] = time.perf_counter() - t0
    # rank 0's shard under tensor parallelism: every projection, the embedding and the head
    # are split N ways (the norms, a rounding error here, are whole on every rank)
    nparams = sum(p.numel() for p in parts.model.parameters()) * tp
    results["params"] = nparams
    results["num_blocks"] = parts.block_manager.num_blocks
    save()
    runner, bm = parts.runner, parts.block_manager
    vocab = model_cfg["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    # ---- prefill (runner level) ------------------------------------------------------------
    for name, batch, length in () if args.no_prefill else (("8x1k", 8, 1024), ("1x8k", 1, 8192)):
        length = min(length, parts.max_model_len - 1)
        prompts = [torch.randint(5, vocab - 1, (length,), generator=gen).tolist()
                   for _ in range(batch)]
        tables = [bm.allocate(p, block_hashes=[]).block_table for p in prompts]
        chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
        runner.execute(chunks)  # warm up
        sync(device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            runner.execute(chunks)
            sync(device)
            times.append(time.perf_counter() - t0)
        for t in tables:
            bm.free(t)
        dt = statistics.median(times)
        tokens = batch * length
        c = model_cfg
        attn_flops = (c["num_hidden_layers"] * 4 * c["hidden_size"] * batch * length * length / 2)
        floor = (2 * nparams * tokens + attn_flops) / tp / (results["matmul_TFLOPs"] * 1e12)
        if tp > 1:  # two all-reduces per layer of [tokens, hidden]
            floor += 2 * c["num_hidden_layers"] * ar[8192] * tokens / 8192 / 1e3
        results[f"prefill_{name}"] = {"seconds": dt, "tokens_per_s": tokens / dt,
                                      "roofline_s": floor, "pct_of_roofline": floor / dt}
        save()

    # ---- decode (engine.step) --------------------------------------------------------------
    engine = LLMEngine(parts)
    sh = shapes(model_cfg)
    for batch in batches:
        runs = [decode_run(engine, batch, args.ctx, args.steps, seed=run, vocab=vocab)
                for run in range(args.runs)]
        step_ms = statistics.median(statistics.median(r) for r in runs) * 1e3
        mean_ctx = args.ctx + 1 + 5 + (args.steps - 1) / 2  # KV read by the timed steps
        roof = decode_roofline(sh, batch, mean_ctx, results["copy_TBps"] * 1e12,
                               results["matmul_TFLOPs"] * 1e12, tp,
                               2 * sh["layers"] * ar[batch])
        results[f"decode_b{batch}"] = {
            "step_ms": step_ms, "run_medians_ms": [statistics.median(r) * 1e3 for r in runs],
            **roof, "pct_of_roofline": roof["roofline_ms"] / step_ms,
            "graphs": bool(runner.graphs)}
        save()
        if cuda and not args.no_profile:
            results[f"decode_b{batch}"]["profile"] = profile_step(engine, batch, args.ctx,
                                                                  vocab, device)
            save()
    del engine, parts, runner, bm
    if cuda:
        torch.cuda.empty_cache()

    # ---- transformers, same shapes ---------------------------------------------------------
    if not args.no_transformers:
        for batch in [b for b in batches if b <= 32]:
            try:
                results[f"transformers_b{batch}_step_ms"] = transformers_decode(
                    cfg_dir, batch, args.ctx, min(args.steps, 50), device)
            except Exception as e:  # noqa: BLE001 - the table says what failed
                results[f"transformers_b{batch}_step_ms"] = f"failed: {type(e).__name__}: {e}"
            save()

    print(f"\n{results['device']}, torch {results['torch']}: copy {results['copy_TBps']:.2f} "
          f"TB/s (r+w), matmul {results['matmul_TFLOPs']:.0f} TFLOP/s"
          f"{f', tensor parallel {tp}' if tp > 1 else ''}; JSON {out}")
    if tp > 1:
        print("   all-reduce ms per call: " + ", ".join(f"{k} rows {v:.3f}"
                                                       for k, v in sorted(ar.items())))
    for b in batches:
        r = results[f"decode_b{b}"]
        prof = r.get("profile")
        if prof:
            print(f"   b={b}: GPU busy {prof['gpu_us_per_step']:.0f} us of "
                  f"{prof['wall_us_per_step']:.0f} us wall per profiled step, "
                  f"{prof['kernels_per_step']:.0f} kernels")
            print(f"   b={b}: host phases (us/step): " + ", ".join(
                f"{k} {v:.0f}" for k, v in prof["host_phases_us"].items()))
        for k in (prof or {}).get("top", [])[:8]:
            print(f"   b={b}: {k['us_per_step']:8.1f} us/step {k['calls_per_step']:5.0f} calls "
                  f" {k['kernel']}")
    print("\n| measure | pdserve | roofline | % | transformers |")
    print("|---|---|---|---|---|")
    for k in [k for k in ("prefill_8x1k", "prefill_1x8k") if k in results]:
        r = results[k]
        print(f"| {k} | {r['tokens_per_s']:.0f} tok/s | {r['roofline_s'] * 1e3:.1f} ms floor "
              f"vs {r['seconds'] * 1e3:.1f} ms | {100 * r['pct_of_roofline']:.0f}% | |")
    for b in batches:
        r = results[f"decode_b{b}"]
        hf = results.get(f"transformers_b{b}_step_ms")
        hf = f"{hf:.2f} ms" if isinstance(hf, float) else (hf or "")
        print(f"| decode b={b}, ctx {args.ctx}+ (engine.step) | {r['step_ms']:.2f} ms/step | "
              f"{r['roofline_ms']:.2f} ms (GEMM {r['gemm_ms']:.2f} + KV {r['kv_ms']:.2f}"
              f"{ar_note(r)}) | "
              f"{100 * r['pct_of_roofline']:.0f}% | {hf} |")


if __name__ == "__main__":
    main()
