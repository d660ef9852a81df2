"""Microbenchmarks of the Triton kernels on one GPU, at Llama-3-8B shapes (32 query heads,
8 KV heads, head_dim 128, bf16, block_size 16). Prints a table; never asserts.

- prefill attention: one causal sequence of S tokens read through a shuffled block table,
  TFLOP/s (2 * 2 * S * S / 2 * H * D flops) next to torch's scaled_dot_product_attention on
  the same K/V, contiguous, per backend (flash / cudnn / efficient; GQA through enable_gqa);
- decode attention: TB/s (K/V bytes read + q/out) against a device-to-device copy measured in
  the same run (bytes read + written); many launches run as one CUDA graph, and small cases
  rotate over several block tables so that L2 does not hold the whole working set;
- gather_blocks: 256 random 2 MiB blocks (Llama-3-8B: 32 layers) of a 1024-block pool into
  another pool, against a contiguous copy of the same bytes and 256 per-block copies;
- the elementwise kernels (rms_norm, rotary, silu_and_mul, write_kv) at 4096 tokens.

Usage: python bench/kernel_speed.py [--out DIR] [--quick] [--tune] [--sections prefill,decode,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.attention import DECODE_SPLIT_SIZE, decode_attention, prefill_attention
from pdserve.kernels.block_copy import gather_blocks
from pdserve.kernels.kv_cache import write_kv, write_kv_ref
from pdserve.kernels.norm import rms_norm, rms_norm_ref
from pdserve.kernels.rotary import rotary, rotary_ref

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
DEV = "cuda"
ROWS: list[dict] = []


def ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn (events around each call)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ms_graph(fns: list[Callable[[], object]]) -> float:
    """Median milliseconds per call of fns run back to back as one CUDA graph (no launch gaps)."""
    for f in fns[:2]:
        f()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return ms(g.replay) / len(fns)


def row(section: str, case: str, value: float, unit: str, ref_name: str = "", ref: float = 0.0,
        note: str = "") -> None:
    r = {"section": section, "case": case, "value": round(value, 2), "unit": unit,
         "ref": ref_name, "ref_value": round(ref, 2),
         "ratio": round(value / ref, 3) if ref else None, "note": note}
    ROWS.append(r)
    ratio = f"{value / ref:6.1%}" if ref else ""
    print(f"{section:<10} {case:<28} {value:9.2f} {unit:<7} {ref_name:<22} {ref:9.2f} {ratio:>7} "
          f"{note}", flush=True)


def copy_tbps() -> float:
    x = torch.randn(1 << 28, device=DEV, dtype=DT)  # 512 MiB, far above L2
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / t / 1e9  # read + write, TB/s


def shuffled_pool(num_tokens_list: list[int], num_layers: int = 1, sets: int = 1):
    """A pool holding `sets` copies of a batch's blocks (random data, random block order) and
    one block table per set."""
    blocks = [-(-n // BS) for n in num_tokens_list]
    total = sum(blocks) * sets
    pool = torch.randn(total, num_layers, 2, BS, HKV, D, device=DEV, dtype=DT)
    perm = torch.randperm(total, device=DEV)
    width = max(blocks)
    tables, used = [], 0
    for _ in range(sets):
        t = torch.zeros(len(blocks), width, dtype=torch.int32, device=DEV)
        for b, n in enumerate(blocks):
            t[b, :n] = perm[used:used + n]
            used += n
        tables.append(t)
    return pool, tables


def prefill_inputs(S: int):
    """q, k, v of one S-token causal sequence, K/V written into a shuffled paged pool, and
    a closure running our prefill attention over it."""
    pool, (table,) = shuffled_pool([S])
    q = torch.randn(S, HQ, D, device=DEV, dtype=DT)
    k = torch.randn(S, HKV, D, device=DEV, dtype=DT)
    v = torch.randn(S, HKV, D, device=DEV, dtype=DT)
    pos = torch.arange(S, device=DEV)
    slots = table[0].long()[pos // BS] * BS + pos % BS
    write_kv(pool, 0, k, v, slots)  # the same K/V as SDPA sees, paged and shuffled
    qsl = torch.tensor([0, S], dtype=torch.int32, device=DEV)
    lens = torch.tensor([S], dtype=torch.int32, device=DEV)
    return q, k, v, lambda: prefill_attention(q, pool, 0, table, qsl, lens, D ** -0.5, S, S)


def decode_fns(B: int, ctx: int, split_size: int = DECODE_SPLIT_SIZE):
    """(bytes moved per call, closures of decode attention over rotating block tables)."""
    kv_bytes = B * ctx * HKV * D * 2 * DT.itemsize
    sets = max(1, min(64, (256 << 20) // kv_bytes))  # >= 256 MiB touched per round: not L2
    pool, tables = shuffled_pool([ctx] * B, sets=sets)
    q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    fns = [lambda t=t: decode_attention(q, pool, 0, t, lens, D ** -0.5, ctx, split_size=split_size)
           for t in tables * max(1, 16 // sets)]
    return kv_bytes + 2 * B * HQ * D * DT.itemsize, fns


def sdpa_rates(q, k, v, flops: float, ours: Callable[[], torch.Tensor]) -> dict:
    """TFLOP/s of torch SDPA per backend on the same q/k/v (contiguous [1, H, S, D])."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    ke, ve = (x.repeat_interleave(HQ // HKV, dim=1) for x in (ks, vs))
    calls = {
        "enable_gqa": lambda: sdpa(qs, ks, vs, is_causal=True, scale=D ** -0.5, enable_gqa=True),
        "k/v expanded to 32 heads": lambda: sdpa(qs, ke, ve, is_causal=True, scale=D ** -0.5),
    }
    rates = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        calls["enable_gqa"]()
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    picked = next((k for k in kernels if any(w in k.lower() for w in
                                              ("flash", "fmha", "cudnn", "attention", "sdpa"))),
                  ",".join(kernels)[:60])
    rates["default"] = (flops / ms(calls["enable_gqa"]) / 1e9, f"torch picks: {picked[:60]}")
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for note, fn in calls.items():
            try:
                with sdpa_kernel(backend):
                    ref = fn()
                    rates[name] = (flops / ms(fn) / 1e9, note)
            except RuntimeError as e:
                print(f"  sdpa {name} ({note}): unavailable ({str(e).splitlines()[0][:70]})")
                continue
            err = ((ours().float() - ref[0].transpose(0, 1).float()).norm()
                   / ref.float().norm()).item()
            print(f"  check vs sdpa {name}: relative error {err:.1e}")
            break
    return rates


def bench_prefill(seq_lens: list[int]) -> None:
    for S in seq_lens:
        q, k, v, ours = prefill_inputs(S)
        flops = 2 * 2 * S * S / 2 * HQ * D
        t_ours = ms(ours)
        for name, (tflops, note) in sdpa_rates(q, k, v, flops, ours).items():
            row("prefill", f"S={S}", flops / t_ours / 1e9, "TFLOP/s", f"sdpa {name}", tflops, note)
        torch.cuda.empty_cache()


def bench_decode(batches: list[int], contexts: list[int], copy_bw: float) -> None:
    for ctx in contexts:
        for B in batches:
            nbytes, fns = decode_fns(B, ctx)
            t = ms_graph(fns)
            row("decode", f"B={B} ctx={ctx}", nbytes / t / 1e9, "TB/s", "device copy", copy_bw,
                f"{t * 1e3:.1f} us/call")
            torch.cuda.empty_cache()


def bench_tune(copy_bw: float) -> None:
    """Other tile configs and split sizes on the same inputs: checks the fixed choices."""
    import pdserve.kernels.attention as attn

    base_prefill, base_decode = attn._prefill_config, attn._decode_config
    try:
        for S in (1024, 4096, 16384):
            q, k, v, ours = prefill_inputs(S)
            flops = 2 * 2 * S * S / 2 * HQ * D
            for cfg in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                        (64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3)]:
                attn._prefill_config = lambda d, dt, n, c=cfg: c
                row("tune", f"prefill S={S} {cfg}", flops / ms(ours) / 1e9, "TFLOP/s",
                    note="(BLOCK_M, BLOCK_N, warps, stages)")
        attn._prefill_config = base_prefill
        for B, ctx in ((32, 1024), (256, 1024)):
            for cfg in [(128, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 4), (64, 2, 3), (128, 4, 3)]:
                attn._decode_config = lambda d, dt, c=cfg: c
                nbytes, fns = decode_fns(B, ctx)
                row("tune", f"decode B={B} ctx={ctx} {cfg}", nbytes / ms_graph(fns) / 1e9, "TB/s",
                    "device copy", copy_bw, "(BLOCK_N, warps, stages)")
            attn._decode_config = base_decode
        for B, ctx in ((1, 8192), (32, 1024), (32, 8192)):
            for split in (128, 256, 512, 1024):
                nbytes, fns = decode_fns(B, ctx, split)
                row("tune", f"decode B={B} ctx={ctx} split={split}",
                    nbytes / ms_graph(fns) / 1e9, "TB/s", "device copy", copy_bw)
    finally:
        attn._prefill_config, attn._decode_config = base_prefill, base_decode


def bench_gather(copy_bw: float) -> None:
    layers, num_blocks, num = 32, 1024, 256  # Llama-3-8B: 2 MiB per block
    src = torch.randn(num_blocks, layers, 2, BS, HKV, D, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    src_ids = torch.randperm(num_blocks, device=DEV)[:num]
    dst_ids = torch.randperm(num_blocks, device=DEV)[:num]
    nbytes = 2 * num * src[0].numel() * DT.itemsize  # read + write
    t = ms(lambda: gather_blocks(src, src_ids, dst, dst_ids))
    flat_src = src[:num].reshape(-1)
    flat_dst = dst[:num].reshape(-1)
    t_copy = ms(lambda: flat_dst.copy_(flat_src))
    sl, dl = src_ids.tolist(), dst_ids.tolist()

    def per_block():
        for s, d in zip(sl, dl):
            dst[d].copy_(src[s])

    t_loop = ms(per_block)
    row("gather", "256 x 2 MiB blocks", nbytes / t / 1e9, "TB/s", "contiguous copy",
        nbytes / t_copy / 1e9, f"256 copy_ calls: {nbytes / t_loop / 1e9:.2f} TB/s")


def bench_elementwise() -> None:
    T, H, inter = 4096, 4096, 14336
    x = torch.randn(T, H, device=DEV, dtype=DT)
    res = torch.randn(T, H, device=DEV, dtype=DT)
    w = torch.randn(H, device=DEV, dtype=DT)
    cases = [("rms_norm+residual", 4 * T * H * DT.itemsize,
              lambda: rms_norm(x, w, 1e-5, res), lambda: rms_norm_ref(x, w, 1e-5, res))]
    gu = torch.randn(T, 2 * inter, device=DEV, dtype=DT)
    cases.append(("silu_and_mul", 3 * T * inter * DT.itemsize,
                  lambda: silu_and_mul(gu), lambda: silu_and_mul_ref(gu)))
    qkv = torch.randn(T, HQ + 2 * HKV, D, device=DEV, dtype=DT)
    q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + HKV], qkv[:, HQ + HKV:]
    ang = torch.rand(8192, D // 2, device=DEV) * 100
    cos, sin = ang.cos(), ang.sin()
    pos = torch.randint(0, 8192, (T,), device=DEV)
    cases.append(("rotary", 2 * T * (HQ + HKV) * D * DT.itemsize,
                  lambda: rotary(q, k, pos, cos, sin), lambda: rotary_ref(q, k, pos, cos, sin)))
    pool = torch.randn(T // BS * 2, 2, 2, BS, HKV, D, device=DEV, dtype=DT)
    slots = torch.randperm(pool.shape[0] * BS, device=DEV)[:T]
    cases.append(("write_kv", 4 * T * HKV * D * DT.itemsize,
                  lambda: write_kv(pool, 1, k, v, slots), lambda: write_kv_ref(pool, 1, k, v, slots)))
    for name, nbytes, ours, ref in cases:
        t, t_ref = ms(ours), ms(ref)
        row("elementw", f"{name} T={T}", nbytes / t / 1e9, "TB/s", "torch reference",
            nbytes / t_ref / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for results (json, md)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--tune", action="store_true", help="also time other tile configs/splits")
    ap.add_argument("--sections", default="prefill,decode,gather,elementwise",
                    help="comma-separated sections to run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU")
        sys.exit(0)
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA's "kernel not used" notes
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"{'section':<10} {'case':<28} {'value':>9} {'unit':<7} {'reference':<22} {'ref':>9} "
          f"{'ratio':>7} note")
    copy_bw = copy_tbps()
    row("copy", "512 MiB device copy", copy_bw, "TB/s")
    sections = [
        ("prefill", lambda: bench_prefill([1024, 4096] if args.quick else [1024, 4096, 16384])),
        ("decode", lambda: bench_decode([1, 32, 256], [1024] if args.quick else [1024, 8192],
                                        copy_bw)),
        ("gather", lambda: bench_gather(copy_bw)),
        ("elementwise", bench_elementwise),
    ]
    if args.tune:
        sections.append(("tune", lambda: bench_tune(copy_bw)))
    for name, fn in sections:
        if name != "tune" and name not in args.sections.split(","):
            continue
        start = time.time()
        try:
            fn()
        except Exception as e:  # a benchmark reports, never stops the others
            print(f"{name}: FAILED {type(e).__name__}: {e}")
        print(f"  ({name}: {time.time() - start:.0f} s)", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                       "rows": ROWS}, f, indent=1)
    print("\n| section | case | ours | unit | reference | ref | ratio | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        ratio = f"{r['ratio']:.0%}" if r["ratio"] else ""
        print(f"| {r['section']} | {r['case']} | {r['value']} | {r['unit']} | {r['ref']} | "
              f"{r['ref_value'] or ''} | {ratio} | {r['note']} |")


if __name__ == "__main__":
    main()
