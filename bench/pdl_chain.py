"""A decode layer's four linears at one row, chained, with and without programmatic dependent
launch (issue 16).

A batch-1 step on Llama-3-8B shapes loses ~18 us a layer to the ramps and tails of its kernels:
each GEMM starts reading its weights only once the kernel ahead is done. With programmatic
dependent launch (PDL, Hopper) a kernel launches while the one ahead still runs, asks L2 for its
own weights (which nothing writes), then waits for the one ahead (`gdc_wait`) before reading its
input. cuBLAS kernels don't signal their dependents, so this needs our own skinny kernel
(kernels/gemv.py) on every link. Per layer, in a CUDA graph over 32 layers' own weights (L2 holds
none of a layer's weights when it starts), median of 3 measurements of `--iters` replays:

  cublas     the engine's path: the Triton prologue kernel (residual add + RMSNorm, SiLU-and-mul)
             + cuBLAS, for qkv (norm), o_proj, gate_up (norm), down (silu)
  skinny     kernels/gemv.py's linear_skinny, one launch each (the sweep's best tiles)
  pdl1       the same launched as programmatic dependents (launch overlap only)
  pdl2       pdl1 + each program's weight slice asked of L2 before the wait
  mixed      pdl2, but gate_up through the prologue kernel + cuBLAS
  rule       pdl2 with the launcher's default tiles and splits (what the engine runs)
  X+attn     X with the engine's decode attention between qkv and o_proj (batch = rows,
             contexts 1030..1130; launched as a programmatic dependent in the pdl chains)

Each layer's input is the one before's output (qkv -> o_proj -> gate_up -> down -> next qkv), so
the chain is a real dependency chain; the outputs of every skinny variant must be the same bits
(PDL changes when a kernel starts, never what it computes): checked and printed.

    python bench/pdl_chain.py --out $OUT           # JSON: pdl_chain.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from decode_attention_sweep import HKV, Timer, copy_rate, make_batch

from pdserve.kernels.attention import decode_attention
from pdserve.kernels.gemv import linear_fused, linear_skinny

H, QKV, INTER = 4096, 6144, 14336
TILE = {"block_n": 16, "block_k": 512, "num_warps": 4, "num_stages": 3}  # the sweep's best
SPLITS = {"qkv": 3, "o": 2, "gu": 1, "down": 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", default="1")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--gu-splits", default="1,2", help="gate_up splits tried under pdl2")
    args = ap.parse_args()
    dev, dt, L = "cuda", torch.bfloat16, args.layers
    t0 = time.perf_counter()
    torch.manual_seed(0)

    def w(n: int, k: int) -> list[torch.Tensor]:
        return [torch.empty(n, k, device=dev, dtype=dt).normal_(0, 0.02) for _ in range(L)]

    wqkv, wo, wgu, wd = w(QKV, H), w(H, H), w(2 * INTER, H), w(H, INTER)
    # the "+attn" chains: decode attention between qkv and o_proj (q from qkv's output), the
    # engine's kernel over contexts 1030..1130 in a pool of every layer's KV
    rows_max = max(int(r) for r in args.rows.split(","))
    per_seq = -(-1130 // 16)
    num_blocks = rows_max * per_seq + 16
    pool = torch.empty(num_blocks, L, 2, 16, HKV, 128, device=dev, dtype=dt).normal_(0, 1)
    gen = torch.Generator().manual_seed(0)
    n1 = [torch.empty(H, device=dev, dtype=dt).normal_(1, 0.1) for _ in range(L)]
    n2 = [torch.empty(H, device=dev, dtype=dt).normal_(1, 0.1) for _ in range(L)]
    copy = copy_rate(dev)
    weight_bytes = sum(t.numel() * 2 for t in (wqkv[0], wo[0], wgu[0], wd[0]))
    res: dict = {"device": torch.cuda.get_device_name(), "copy_GBps": copy / 1e9, "layers": L,
                 "weight_MB_per_layer": weight_bytes / 1e6, "rows": {}}
    print(f"{res['device']}: copy {copy / 1e9:.0f} GB/s (read+write); a layer's weights "
          f"{weight_bytes / 1e6:.0f} MB = {weight_bytes / copy * 1e6:.1f} us at the copy rate")

    def chain(m: int, kind: str, gu_split: int = 1, attn: dict | None = None):
        def lin(name: str, x, wt, **kw):
            if kind == "cublas" or (kind == "mixed" and name == "gu"):
                return linear_fused(x, wt, None, max_rows=0, **kw)
            pdl = {"skinny": 0, "pdl1": 1}.get(kind, 2)
            split = gu_split if name == "gu" else SPLITS[name]
            if kind == "rule":  # the launcher's own tiles and splits
                return linear_skinny(x, wt, None, pdl=2, **kw)
            return linear_skinny(x, wt, None, split_k=split, pdl=pdl, **TILE, **kw)

        def run(x0: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
            x, r = x0, r0
            for layer in range(L):
                qkv, r = lin("qkv", x, wqkv[layer], prologue="norm", residual=r,
                             norm_weight=n1[layer], eps=1e-5)
                a = qkv[:, :H]
                if attn is not None:
                    a = decode_attention(a.view(m, 32, 128), pool, layer, attn["tables"],
                                         attn["seq_lens"], 128**-0.5, 8192,
                                         pdl=kind not in ("cublas", "skinny")).view(m, H)
                o, _ = lin("o", a, wo[layer])
                gu, r = lin("gu", o, wgu[layer], prologue="norm", residual=r,
                            norm_weight=n2[layer], eps=1e-5)
                x, _ = lin("down", gu, wd[layer], prologue="silu")
            return x
        return run

    def timed(run, x0, r0) -> tuple[float, torch.Tensor]:
        for _ in range(2):
            run(x0, r0)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run(x0, r0)
        g.replay()
        torch.cuda.synchronize()
        ref = out.clone()
        timer, ts = Timer(dev), []
        for _ in range(3):
            timer.start()
            for _ in range(args.iters):
                g.replay()
            ts.append(timer.stop() / (args.iters * L) * 1e6)
        return statistics.median(ts), ref

    for m in [int(r) for r in args.rows.split(",")]:
        x0 = torch.randn(m, H, device=dev, dtype=dt)
        r0 = torch.randn(m, H, device=dev, dtype=dt)
        row: dict = {}
        outs: dict = {}
        kinds = [("cublas", 1), ("skinny", 1), ("pdl1", 1)]
        kinds += [("pdl2", s) for s in (int(s) for s in args.gu_splits.split(","))]
        kinds += [("mixed", 1), ("rule", 1)]
        batch = make_batch(m, 1030, 1130, 16, 8192, num_blocks, gen, dev)
        kinds += [(k + "+attn", gs) for k, gs in kinds]
        for kind, gs in kinds:
            name = kind if not kind.startswith("pdl2") or gs == 1 else f"{kind}_gu{gs}"
            attn = batch if kind.endswith("+attn") else None
            try:
                row[name], outs[name] = timed(chain(m, kind.removesuffix("+attn"), gs, attn),
                                              x0, r0)
            except Exception as e:  # noqa: BLE001 - report and go on
                row[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                print(f"rows {m} {name}: {row[name]}", flush=True)
                continue
            print(f"rows {m} {name:9s} {row[name]:7.2f} us a layer "
                  f"({weight_bytes / (row[name] * 1e-6) / 1e9:.0f} GB/s)", flush=True)
        same = {}
        for k, v in outs.items():
            base = outs.get("skinny+attn" if k.endswith("+attn") else "skinny")
            if not k.startswith(("cublas", "mixed", "skinny", "rule")) and base is not None:
                same[k] = bool(torch.equal(v.view(torch.int16), base.view(torch.int16)))
        base = outs.get("skinny")
        if "cublas" in outs and base is not None:
            d = (outs["cublas"].float() - base.float()).norm() / outs["cublas"].float().norm()
            row["skinny_vs_cublas_rel"] = float(d)
        row["same_bits_as_skinny"] = same
        print(f"rows {m}: same bits as skinny: {same}; skinny vs cublas relative "
              f"{row.get('skinny_vs_cublas_rel', float('nan')):.2e}")
        res["rows"][str(m)] = row
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pdl_chain.json").write_text(json.dumps(res, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
