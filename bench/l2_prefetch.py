"""Does warming L2 with o_proj's weights beside a decode step's attention pay? (issue 16)

A batch-1 decode step on Llama-3-8B shapes spends ~9 us a layer in decode attention (a chain of
dependent loads, HBM mostly idle) and then streams o_proj's 32 MiB of weights from HBM. This
bench times, per layer (32 layers' own weights and KV in a CUDA graph, so L2 holds nothing a
unit did not bring in itself), median of 3 measurements of `--iters` replays:

  o          o_proj alone (x @ Wo^T, cuBLAS, as the engine)
  pf+o       kernels/prefetch.py's l2_prefetch(Wo), then o_proj, one stream
  attn+o     decode attention (the engine's kernel, contexts 1030..1130), then o_proj
  attn|pf+o  the prefetch on a side stream beside the attention, then o_proj
  layer      qkv, attention, o_proj, gate_up, down (the GEMMs and the attention of a layer)
  layer|pf   the same with the side-stream prefetch beside the attention

for each prefetch variant (bulk / load) and program count, at the given batches; the
difference layer - layer|pf x 32 is what a step would save. Same-run device copy rate printed
beside. JSON: l2_prefetch.json.

    python bench/l2_prefetch.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decode_attention_sweep import HKV, Timer, copy_rate, make_batch

from pdserve.kernels.attention import decode_attention
from pdserve.kernels.prefetch import l2_prefetch

H, QKV, INTER = 4096, 6144, 14336


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="bulk:4,bulk:16,bulk:32,load:16,load:32,load:66",
                    help="variant:programs, comma separated")
    ap.add_argument("--max-seq-len", type=int, default=8192)
    args = ap.parse_args()
    dev, dt, L = "cuda", torch.bfloat16, args.layers
    t0 = time.perf_counter()
    torch.manual_seed(0)

    def w(n: int, k: int) -> list[torch.Tensor]:
        return [torch.empty(n, k, device=dev, dtype=dt).normal_(0, 0.02) for _ in range(L)]

    wqkv, wo, wgu, wd = w(QKV, H), w(H, H), w(2 * INTER, H), w(H, INTER)
    batches = [int(b) for b in args.batches.split(",")]
    bs, per_seq = 16, -(-1130 // 16)
    num_blocks = max(batches) * per_seq + 16
    pool = torch.empty(num_blocks, L, 2, bs, HKV, 128, device=dev, dtype=dt).normal_(0, 1)
    gen = torch.Generator().manual_seed(0)
    scratch = torch.zeros(256, dtype=torch.int32, device=dev)
    side = torch.cuda.Stream()
    copy = copy_rate(dev)
    results: dict = {"device": torch.cuda.get_device_name(), "copy_GBps": copy / 1e9,
                     "layers": L, "iters": args.iters, "rows": []}
    print(f"{results['device']}: copy {copy / 1e9:.0f} GB/s (read+write)")

    def timed(fn) -> float:
        """us per layer: fn(l) for every layer, captured in a graph, replayed."""
        for _ in range(2):
            for layer in range(L):
                fn(layer)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for layer in range(L):
                fn(layer)
        g.replay()
        torch.cuda.synchronize()
        timer, ts = Timer(dev), []
        for _ in range(3):
            timer.start()
            for _ in range(args.iters):
                g.replay()
            ts.append(timer.stop() / (args.iters * L) * 1e6)
        return statistics.median(ts)

    def one_batch(b: int) -> None:
        batch = make_batch(b, 1030, 1130, bs, args.max_seq_len, num_blocks, gen, dev)
        x = torch.randn(b, H, device=dev, dtype=dt)
        xi = torch.randn(b, INTER, device=dev, dtype=dt)
        q = batch["q"]

        def attn(layer: int) -> torch.Tensor:
            return decode_attention(q, pool, layer, batch["tables"], batch["seq_lens"],
                                    128**-0.5, args.max_seq_len)

        def pf_of(variant: str, programs: int):
            def pf(layer: int) -> None:
                l2_prefetch(wo[layer], variant=variant, programs=programs, scratch=scratch)
            return pf

        def beside(pf, layer: int) -> torch.Tensor:
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                pf(layer)
            out = attn(layer)
            main.wait_stream(side)
            return out

        def layer_unit(pf):
            def unit(layer: int) -> None:
                F.linear(x, wqkv[layer])
                a = beside(pf, layer) if pf else attn(layer)
                F.linear(a.reshape(b, H), wo[layer])
                F.linear(x, wgu[layer])
                F.linear(xi, wd[layer])
            return unit

        base = {
            "o": timed(lambda layer: F.linear(x, wo[layer])),
            "attn": timed(attn),
            "attn+o": timed(lambda layer: F.linear(attn(layer).reshape(b, H), wo[layer])),
            "layer": timed(layer_unit(None)),
        }
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f} us" for k, v in base.items()))
        for spec in args.variants.split(","):
            variant, programs = spec.split(":")
            pf = pf_of(variant, int(programs))
            try:
                pf(0)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - say which variant fails, time the rest
                print(f"  {spec:8s} FAILED: {type(e).__name__}: {str(e)[:300]}")
                results["rows"].append({"batch": b, "variant": variant, "failed": str(e)[:300]})
                continue
            row = {"batch": b, "variant": variant, "programs": int(programs), **base,
                   "pf": timed(pf),
                   "pf+o": timed(lambda layer, pf=pf: (pf(layer), F.linear(x, wo[layer]))),
                   "attn|pf+o": timed(lambda layer, pf=pf: F.linear(
                       beside(pf, layer).reshape(b, H), wo[layer])),
                   "layer|pf": timed(layer_unit(pf))}
            row["step_saving_us"] = (row["layer"] - row["layer|pf"]) * L
            results["rows"].append(row)
            print(f"  {spec:8s} pf {row['pf']:6.2f}  pf+o {row['pf+o']:6.2f}  attn|pf+o "
                  f"{row['attn|pf+o']:6.2f} (attn+o {base['attn+o']:.2f})  layer|pf "
                  f"{row['layer|pf']:6.2f} (layer {base['layer']:.2f}): a step saves "
                  f"{row['step_saving_us']:.0f} us", flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "l2_prefetch.json").write_text(json.dumps(results, indent=1))

    for b in batches:
        one_batch(b)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
