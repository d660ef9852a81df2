"""Engine-level GPU figures for issue 9 (part 1), Llama-3-8B shapes with dummy weights, bf16:

- decode step time at batch 1, 32, 256 with 1k-token contexts (CUDA graphs), against the
  HBM roofline: (weight bytes + KV bytes read) / the same-run device-copy rate;
- prefill tokens/s for 8 x 1k and 1 x 8k prompts, against the matmul roofline:
  2 * params * tokens / the same-run bf16 matmul rate (attention flops added).

Writes JSON to --out after every point; prints a table last. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
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


def copy_rate() -> float:
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 20 / (time.perf_counter() - t0)  # read + write bytes/s


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out = Path(args.out) / "serving_gpu.json"
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    results["copy_TBps"] = copy_rate() / 1e12
    results["matmul_TFLOPs"] = matmul_rate() / 1e12
    save()
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.model_runner import SeqChunk
    from pdserve.engine.setup import build_engine

    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    t0 = time.perf_counter()
    parts = build_engine(EngineConfig(model=str(cfg_dir), load_format="dummy", dtype="bfloat16",
                                      skip_tokenizer_init=True, max_model_len=8192,
                                      max_num_seqs=256, gpu_memory_utilization=0.9,
                                      max_num_batched_tokens=8192), progress=False)
    results["build_s"] = time.perf_counter() - t0
    nparams = sum(p.numel() for p in parts.model.parameters())
    weight_bytes = nparams * 2
    results["params"] = nparams
    results["num_blocks"] = parts.block_manager.num_blocks
    save()
    runner, bm = parts.runner, parts.block_manager
    gen = torch.Generator().manual_seed(0)

    def rand_ids(n: int) -> list[int]:
        return torch.randint(5, 128000, (n,), generator=gen).tolist()

    # ---- prefill -------------------------------------------------------------------------
    for name, batch, length in (("8x1k", 8, 1024), ("1x8k", 1, 8192)):
        prompts = [rand_ids(length) for _ in range(batch)]
        tables = [bm.allocate(p, block_hashes=[]).block_table for p in prompts]
        chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
        runner.execute(chunks)  # warm up
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            runner.execute(chunks)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        for t in tables:
            bm.free(t)
        dt = sorted(times)[1]
        tokens = batch * length
        attn_flops = 32 * 4 * 32 * 128 * batch * length * length / 2  # causal QK^T + PV
        floor = (2 * nparams * tokens + attn_flops) / (results["matmul_TFLOPs"] * 1e12)
        results[f"prefill_{name}"] = {"seconds": dt, "tokens_per_s": tokens / dt,
                                      "roofline_s": floor, "pct_of_roofline": floor / dt}
        save()
    # ---- decode ---------------------------------------------------------------------------
    ctx = 1024
    per_token_kv = 32 * 2 * 8 * 128 * 2
    for batch in (1, 32, 256):
        prompts = [rand_ids(ctx) for _ in range(batch)]
        tables = [bm.allocate(p, num_slots=ctx + 64, block_hashes=[]).block_table
                  for p in prompts]
        for i in range(0, batch, 8):  # fill the KV in prefill chunks of 8 sequences
            runner.execute([SeqChunk(p, 0, t, num_logits=0)
                            for p, t in zip(prompts[i:i + 8], tables[i:i + 8])])
        chunks = [SeqChunk([5], ctx, t) for t in tables]
        for _ in range(3):
            runner.execute(chunks)
        torch.cuda.synchronize()
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            runner.execute(chunks)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n
        bytes_moved = weight_bytes + batch * ctx * per_token_kv
        # the copy rate counts bytes read + written: streaming reads alone go at that rate
        floor = bytes_moved / (results["copy_TBps"] * 1e12)
        results[f"decode_b{batch}"] = {"step_ms": dt * 1e3, "roofline_ms": floor * 1e3,
                                       "pct_of_roofline": floor / dt,
                                       "graphs": bool(runner.graphs)}
        for t in tables:
            bm.free(t)
        save()
    print("\n| measure | value | roofline | % |")
    print("|---|---|---|---|")
    for k in ("prefill_8x1k", "prefill_1x8k"):
        r = results[k]
        print(f"| {k} | {r['tokens_per_s']:.0f} tok/s | {r['roofline_s'] * 1e3:.1f} ms floor "
              f"vs {r['seconds'] * 1e3:.1f} ms | {100 * r['pct_of_roofline']:.0f}% |")
    for b in (1, 32, 256):
        r = results[f"decode_b{b}"]
        print(f"| decode b={b} ctx 1k | {r['step_ms']:.2f} ms/step | {r['roofline_ms']:.2f} ms "
              f"| {100 * r['pct_of_roofline']:.0f}% |")
    print(f"copy {results['copy_TBps']:.2f} TB/s (r+w), matmul {results['matmul_TFLOPs']:.0f} "
          f"TFLOP/s, {results['gpu']}")


if __name__ == "__main__":
    main()
