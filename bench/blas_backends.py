"""The decode step's GEMMs under torch's two BLAS back ends, cuBLAS and cuBLASLt
(`torch.backends.cuda.preferred_blas_library`), at the batch sizes of bench/serving_gpu.py,
Llama-3-8B shapes, bf16 (issue 16: the skinny qkv / o_proj GEMMs ran at ~76% of the copy rate
at batch 32, and the batch-256 GEMMs at ~71% of the matmul rate, on an H100).

Each case is a CUDA graph of L calls on L different weights (so weights come from HBM);
time per call = replay / L. Prints, per shape and rows: µs per call under each back end, the
weight bytes per second as a % of half the same-run copy rate (a copy's read + write bytes
per second / 2: a read-only kernel can pass 100%) and the FLOP rate as a % of the same-run
matmul rate.

    python bench/blas_backends.py --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336), ("lm_head", 128256, 4096)]


def rate_copy(dev: torch.device) -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (time.perf_counter() - t)


def rate_matmul(dev: torch.device) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (time.perf_counter() - t)


def graph_us(fn, calls: int, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rows", default="1,32,256")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy, mm = rate_copy(dev), rate_matmul(dev)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy_bytes_per_s": copy, "matmul_flops_per_s": mm, "cases": []}
    path = Path(args.out) / "blas_backends.json"
    backends = ["cublas", "cublaslt"]
    for name, N, K in SHAPES:
        layers = 2 if name == "lm_head" else args.layers
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
              for _ in range(layers)]
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            case = {"name": name, "N": N, "K": K, "M": M}
            ref = None
            for be in backends:
                torch.backends.cuda.preferred_blas_library(be)

                def run(ws=ws, x=x):
                    for w in ws:
                        F.linear(x, w)

                us = graph_us(run, layers)
                y = F.linear(x, ws[0]).float()
                if ref is None:
                    ref = y
                t = us * 1e-6
                case[be] = {"us": us, "read_pct": 100 * N * K * 2 / t / (copy / 2),
                            "flop_pct": 100 * 2 * M * N * K / t / mm,
                            "rel_diff_vs_cublas": ((y - ref).norm() / ref.norm()).item()}
            res["cases"].append(case)
            path.write_text(json.dumps(res, indent=1))
        ws.clear()
        torch.cuda.empty_cache()
    torch.backends.cuda.preferred_blas_library("cublas")
    print(f"{res['device']}: copy {copy / 1e12:.2f} TB/s (r+w), matmul {mm / 1e12:.0f} TFLOP/s")
    print(f"{'gemm':8} {'M':>4} | {'cublas µs':>9} {'read%':>6} {'flop%':>6} | "
          f"{'cublasLt µs':>11} {'read%':>6} {'flop%':>6} | Lt speedup")
    for c in res["cases"]:
        a, b = c["cublas"], c["cublaslt"]
        print(f"{c['name']:8} {c['M']:4d} | {a['us']:9.1f} {a['read_pct']:6.1f} {a['flop_pct']:6.1f} | "
              f"{b['us']:11.1f} {b['read_pct']:6.1f} {b['flop_pct']:6.1f} | {a['us'] / b['us']:.2f}")


if __name__ == "__main__":
    main()
