"""Prefill attention of fresh sequences two ways, on one GPU: the paged Triton kernel
(`prefill_attention`, K/V read through the block table) against `dense_prefill_attention`
(torch's SDPA per sequence on the step's own k/v, copies to a dense layout included), on
Llama-3-8B heads (32 q / 8 KV heads of 128, bf16), per step shape. Sets the length from which
the engine takes the dense path (kernels/attention.py DENSE_PREFILL_MIN_LEN).

    python bench/prefill_paths.py [--out DIR] [--shapes 8x1024,4x2048,2x4096,1x8192]

Median of 10 timed calls after 3, CUDA events; JSON to OUT/prefill_paths.json; a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_transfer import event_ms  # noqa: E402 - the benches' CUDA-event timer
from pdserve.kernels.attention import dense_prefill_attention, prefill_attention  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16  # --dtype float32: the CPU smoke test (the interpreter's bf16 dot is off)


def timed_us(fn, dev: torch.device, reps: int = 10) -> float:
    """Median µs of fn() between CUDA events, after 3 calls (nan off CUDA: a smoke test)."""
    if dev.type != "cuda":
        fn()
        return float("nan")
    return event_ms(fn, dev, reps) * 1e3


def measure(shape: str, dev: torch.device, gen: torch.Generator) -> dict:
    """One step shape ('8x1024': 8 fresh sequences of 1024 tokens): both paths' µs."""
    n_seq, length = (int(x) for x in shape.split("x"))
    lens = (length,) * n_seq
    T = n_seq * length
    q = torch.randn(T, HQ, D, device=dev, dtype=DTYPE, generator=gen)
    kv = torch.randn(T, 2, HKV, D, device=dev, dtype=DTYPE, generator=gen)
    k, v = kv[:, 0], kv[:, 1]
    blocks = T // BS + n_seq
    cache = torch.empty(blocks, 1, 2, BS, HKV, D, device=dev, dtype=DTYPE)
    perm = torch.randperm(blocks, device=dev, generator=gen)
    per = -(-length // BS)
    tables = perm[:n_seq * per].view(n_seq, per)
    slots = (tables[:, :, None] * BS + torch.arange(BS, device=dev)).reshape(n_seq, -1)
    slots = slots[:, :length].reshape(-1)
    cache[slots // BS, 0, 0, slots % BS] = k
    cache[slots // BS, 0, 1, slots % BS] = v
    qsl = torch.arange(0, T + 1, length, device=dev)
    seq_lens = torch.full((n_seq,), length, device=dev)
    scale = D ** -0.5

    def paged() -> torch.Tensor:
        return prefill_attention(q, cache, 0, tables, qsl, seq_lens, scale, length, length)

    def dense() -> torch.Tensor:
        return dense_prefill_attention(q, k, v, lens, scale)

    err = ((dense().float() - paged().float()).norm() / paged().float().norm()).item()
    flops = 4 * n_seq * length * length / 2 * HQ * D
    r = {"shape": shape, "paged_us": timed_us(paged, dev), "dense_us": timed_us(dense, dev),
         "rel_err": err}
    r["paged_tflops"] = flops / r["paged_us"] / 1e6
    r["dense_tflops"] = flops / r["dense_us"] / 1e6
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="8x1024,4x2048,2x4096,1x8192,1x16384")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test (TRITON_INTERPRET=1)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        rows.append(measure(shape, dev, gen))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out = {"device": name, "torch": torch.__version__, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill_paths.json").write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}: one layer's prefill attention, fresh sequences")
    print("| step | paged µs (TFLOP/s) | dense µs (TFLOP/s) | dense / paged time | rel. diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['paged_us']:.0f} ({r['paged_tflops']:.0f}) | "
              f"{r['dense_us']:.0f} ({r['dense_tflops']:.0f}) | "
              f"{r['dense_us'] / r['paged_us']:.2f} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
