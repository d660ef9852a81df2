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
    python bench/blas_backends.py --forms --rows 1,4 --out /tmp/out   # other call forms

`--forms` times, under cuBLAS only, other ways to ask for the same product at few rows (each
picks its own kernel): "linear" F.linear(x, W) (the engine's), "nn" (W @ x^T)^T (W as the left
operand), "mv" torch.mv(W, x) (one row only), and "linear_fp32red" F.linear with
allow_bf16_reduced_precision_reduction off (which changes cuBLAS's split-K choice).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_gpu as sg  # noqa: E402 - the same-run copy and matmul rates
from gemv_sweep import graph_time  # noqa: E402 - one CUDA graph timer

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336), ("lm_head", 128256, 4096)]


def _cases(args: argparse.Namespace, dev: torch.device):
    """Per shape, its layers' weights (2 for the LM head), then per row count of --rows an
    input: yields (weights, x, the case's record); frees each shape's weights after it."""
    for name, N, K in SHAPES:
        layers = 2 if name == "lm_head" else args.layers
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
              for _ in range(layers)]
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            yield ws, x, {"name": name, "N": N, "K": K, "M": M}
        ws.clear()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rows", default="1,32,256")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--forms", action="store_true", help="other call forms (see above)")
    args = ap.parse_args()
    if args.forms:
        forms(args)
        return
    dev = torch.device("cuda")
    copy, mm = sg.copy_rate(dev, 1 << 27), sg.matmul_rate(dev, 8192)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy_bytes_per_s": copy, "matmul_flops_per_s": mm, "cases": []}
    path = Path(args.out) / "blas_backends.json"
    backends = ["cublas", "cublaslt"]
    for ws, x, case in _cases(args, dev):
        layers, (M, N, K) = len(ws), (case["M"], case["N"], case["K"])
        ref = None
        for be in backends:
            torch.backends.cuda.preferred_blas_library(be)

            def run(ws=ws, x=x):
                for w in ws:
                    F.linear(x, w)

            us = graph_time(run) / layers * 1e6
            y = F.linear(x, ws[0]).float()
            if ref is None:
                ref = y
            t = us * 1e-6
            case[be] = {"us": us, "read_pct": 100 * N * K * 2 / t / (copy / 2),
                        "flop_pct": 100 * 2 * M * N * K / t / mm,
                        "rel_diff_vs_cublas": ((y - ref).norm() / ref.norm()).item()}
        res["cases"].append(case)
        path.write_text(json.dumps(res, indent=1))
    torch.backends.cuda.preferred_blas_library("cublas")
    print(f"{res['device']}: copy {copy / 1e12:.2f} TB/s (r+w), matmul {mm / 1e12:.0f} TFLOP/s")
    print(f"{'gemm':8} {'M':>4} | {'cublas µs':>9} {'read%':>6} {'flop%':>6} | "
          f"{'cublasLt µs':>11} {'read%':>6} {'flop%':>6} | Lt speedup")
    for c in res["cases"]:
        a, b = c["cublas"], c["cublaslt"]
        print(f"{c['name']:8} {c['M']:4d} | {a['us']:9.1f} {a['read_pct']:6.1f} {a['flop_pct']:6.1f} | "
              f"{b['us']:11.1f} {b['read_pct']:6.1f} {b['flop_pct']:6.1f} | {a['us'] / b['us']:.2f}")


def forms(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    copy = sg.copy_rate(dev, 1 << 27)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy_bytes_per_s": copy, "cases": []}
    path = Path(args.out) / "blas_forms.json"
    matmul = torch.backends.cuda.matmul
    default_red = matmul.allow_bf16_reduced_precision_reduction
    kinds = {
        "linear": lambda x, w: F.linear(x, w),
        "nn": lambda x, w: (w @ x.t()).t(),
        "mv": lambda x, w: torch.mv(w, x[0]).unsqueeze(0),
        "linear_fp32red": lambda x, w: F.linear(x, w),
    }
    print(f"{torch.cuda.get_device_name()}: copy {copy / 1e12:.2f} TB/s (r+w); "
          f"reduced-precision reduction default {default_red}")
    for ws, x, case in _cases(args, dev):
        layers, (M, N, K) = len(ws), (case["M"], case["N"], case["K"])
        ref = F.linear(x, ws[0]).float()
        for kind, fn in kinds.items():
            if kind == "mv" and M != 1:
                continue
            matmul.allow_bf16_reduced_precision_reduction = (
                False if kind == "linear_fp32red" else default_red)

            def run(ws=ws, x=x, fn=fn):
                for w in ws:
                    fn(x, w)

            us = graph_time(run) / layers * 1e6
            y = fn(x, ws[0]).float()
            case[kind] = {"us": us, "read_pct_of_copy": 100 * N * K * 2 / (us * 1e-6) / copy,
                          "rel_diff_vs_linear": ((y - ref).norm() / ref.norm()).item()}
        matmul.allow_bf16_reduced_precision_reduction = default_red
        res["cases"].append(case)
        path.write_text(json.dumps(res, indent=1))
        print(f"{case['name']:8} M={M:3d} " + "  ".join(
            f"{k} {v['us']:6.1f} us ({v['read_pct_of_copy']:3.0f}%)"
            for k, v in case.items() if isinstance(v, dict)), flush=True)


if __name__ == "__main__":
    main()
