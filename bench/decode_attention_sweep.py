"""Decode attention alone on one GPU over a grid of kernel configs (issue 16), Llama-3-8B
shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, the engine's KV block size (16).

For each batch (1, 32, 256) the sequences get contexts drawn once (seeded) from
[--ctx-lo, --ctx-hi] (default 1030..1130: what bench/serving_gpu.py's timed steps read) and
shuffled blocks of a block-major pool with all `--layers` (32) layers, as the engine's pool.
One timed unit is the op over every layer (a different layer's KV each call, so the L2 cache
holds none of it, as in a real step), captured in a CUDA graph as the engine's decode graphs
are and replayed `iters` times between CUDA events; time per call = elapsed / (iters x
layers); the median of 3 such measurements. The op is called as the engine's graphs call it:
`max_seq_len` = the engine's max_model_len (--max-seq-len, 8192).

(The first sweep, session 7 call 1, ran an earlier kernel: a fixed grid of 8192 / SPLIT_SIZE
programs per sequence and KV head, a separate reduce kernel or the fused one, and a DIRECT
path when one split covered max_seq_len; its figures are in BENCHMARKS.md. The kernel now
spreads a sequence's splits over a number of programs chosen from the batch, which does not
change results, so this sweep measures that launcher's choice.)

Configs: SPLIT_SIZE x BLOCK_N x num_warps x num_stages (`decode_attention`'s keyword
arguments, constexprs of the kernel). Every config's output at each batch is checked against
the fp32 reference on layer 0 (relative error, bf16 tolerance 1e-2). The split size is never
chosen from the batch (a sequence's result must not depend on its batch), so the sweep ends
with the best config per batch and the best single config across batches (the smallest
geometric mean of its time over the per-batch best).

KV bandwidth = the KV bytes the batch's sequences hold (seq_len x 8 heads x 128 x 2 (K, V) x 2
bytes) / time per call, against the same-run device copy bandwidth (a 1 GiB torch copy,
read + write bytes / time, as bench/serving_gpu.py measures it).

    python bench/decode_attention_sweep.py --out $OUT          # JSON: decode_attention_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

HQ, HKV, D = 32, 8, 128
KEYS = ("split", "block_n", "warps", "stages")
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float16}  # the interpreter's bf16 dot is wrong


class Timer:
    """Seconds between start() and stop(): CUDA events on the GPU, the host clock on the CPU
    (`--device cpu` under TRITON_INTERPRET=1 is a smoke test of this script, not a timing)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.e0, self.e1 = (torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event(enable_timing=True))
            self.e0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.e1.record()
            self.e1.synchronize()
            return self.e0.elapsed_time(self.e1) / 1e3
        return time.perf_counter() - self.t0


def copy_rate(device: str, numel: int = 1 << 29) -> float:
    """Device copy, read + write bytes/s, warm."""
    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    rates = []
    timer = Timer(device)
    for _ in range(3):
        timer.start()
        for _ in range(10):
            y.copy_(x)
        rates.append(2 * x.numel() * x.element_size() * 10 / timer.stop())
    del x, y
    return statistics.median(rates)


def make_batch(batch: int, lo: int, hi: int, block_size: int, max_seq_len: int,
               num_blocks: int, gen: torch.Generator, device: str) -> dict:
    seq_lens = torch.randint(lo, hi + 1, (batch,), generator=gen)
    need = [-(-int(s) // block_size) for s in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen)[:sum(need)]
    width = -(-max_seq_len // block_size)
    tables = torch.zeros(batch, width, dtype=torch.int64)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n]
        at += n
    q = torch.randn(batch, HQ, D, generator=gen).to(DTYPE[device])
    return {"q": q.to(device), "tables": tables.to(device), "seq_lens": seq_lens.to(device),
            "kv_bytes": int(seq_lens.sum()) * HKV * D * 2 * 2, "max_ctx": int(seq_lens.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda",
                    help="cpu: a smoke test under TRITON_INTERPRET=1 (fp16, host clock)")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--ctx-lo", type=int, default=1030)
    ap.add_argument("--ctx-hi", type=int, default=1130)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=8192)
    ap.add_argument("--splits", default="64,128,256,512,1024,8192")
    ap.add_argument("--block-ns", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--spreads", default="",
                    help="after the sweep, the default config at each batch with these "
                         "programs per (sequence, KV head), e.g. 1,2,4,8 (a launch choice: "
                         "results are the same bits; only the time changes)")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="start no new config after this many seconds from the start (compiles "
                         "included; the JSON and the table report what ran)")

    args = ap.parse_args()

    from pdserve.kernels.attention import (
        DECODE_SPLIT_SIZE,
        _decode_config,
        decode_attention,
        decode_attention_ref,
    )

    t_start = time.perf_counter()
    out_path = Path(args.out) / "decode_attention_sweep.json"
    batches = [int(b) for b in args.batches.split(",")]
    dbn, dwarps, dstages = _decode_config(D, torch.bfloat16)
    default = (DECODE_SPLIT_SIZE, dbn, dwarps, dstages)
    configs = [c for c in itertools.product(
        *(sorted(int(x) for x in s.split(",")) for s in (args.splits, args.block_ns, args.warps,
                                                          args.stages)))
        if c[1] <= c[0] and c[0] % c[1] == 0]
    # the default first, then every (split, tile) at the usual warps/stages before the rest,
    # so a sweep cut short by --budget-s has still covered the splits and tiles
    ws_order = [(4, 3), (4, 2), (8, 3), (4, 4), (8, 2), (8, 4)]
    configs.sort(key=lambda c: (ws_order.index(c[2:]) if c[2:] in ws_order else len(ws_order),
                                c[2:], c[0], c[1]))
    if default in configs:
        configs.remove(default)
    configs.insert(0, default)
    dev = args.device
    cuda = dev == "cuda"
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                 "torch": torch.__version__,
                 "triton": __import__("triton").__version__, "shapes": f"Hq {HQ}, Hkv {HKV}, "
                 f"D {D}, bf16, block {args.block_size}", "ctx": [args.ctx_lo, args.ctx_hi],
                 "layers": args.layers, "max_seq_len": args.max_seq_len,
                 "default": dict(zip(KEYS, default)),
                 "configs": []}

    def save() -> None:
        out_path.write_text(json.dumps(res, indent=1))

    res["copy_TBps"] = copy_rate(dev, 1 << (29 if cuda else 20)) / 1e12
    save()
    gen = torch.Generator().manual_seed(0)
    per_seq = -(-args.ctx_hi // args.block_size)
    num_blocks = max(batches) * per_seq + 16
    pool = torch.empty(num_blocks, args.layers, 2, args.block_size, HKV, D, dtype=DTYPE[dev],
                       device=dev)
    for i in range(0, num_blocks, 1024):
        pool[i:i + 1024].normal_()
    data = {b: make_batch(b, args.ctx_lo, args.ctx_hi, args.block_size, args.max_seq_len,
                          num_blocks, gen, dev) for b in batches}
    scale = D ** -0.5
    refs = {b: decode_attention_ref(d["q"].float(), pool[:, :1].float(), 0, d["tables"],
                                    d["seq_lens"], scale, d["max_ctx"])
            for b, d in data.items()}
    res["pool_GB"] = pool.numel() * pool.element_size() / 1e9
    timer = Timer(dev)

    def call(b: int, cfg: tuple, layer: int, spread: int | None = None) -> torch.Tensor:
        d = data[b]
        split, bn, warps, stages = cfg
        return decode_attention(d["q"], pool, layer, d["tables"], d["seq_lens"], scale,
                                args.max_seq_len, split_size=split, block_n=bn,
                                num_warps=warps, num_stages=stages, programs_per_head=spread)

    # replays per sample: ~20 ms of GPU time at 3 TB/s (at least 8 us a call)
    rounds = {b: max(2, math.ceil(20e-3 / (args.layers * max(8e-6, data[b]["kv_bytes"] / 3e12))))
              if cuda else 1 for b in batches}

    def time_config(cfg: tuple, spread: int | None = None) -> dict:
        row: dict = dict(zip(KEYS, cfg))
        for b in batches:
            got = call(b, cfg, 0, spread)
            err = ((got.double() - refs[b].double()).norm() / refs[b].double().norm()).item()
            for _ in range(2 if cuda else 0):
                for layer in range(args.layers):
                    call(b, cfg, layer, spread)

            def layers(b: int = b) -> None:
                for layer in range(args.layers):
                    call(b, cfg, layer, spread)

            replay = layers
            if cuda:
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    layers()
                g.replay()
                torch.cuda.synchronize()
                replay = g.replay
            samples = []
            for _ in range(3):
                timer.start()
                for _ in range(rounds[b]):
                    replay()
                samples.append(timer.stop() / (rounds[b] * args.layers))
            replay = None
            t = statistics.median(samples)
            row[f"b{b}"] = {"us": t * 1e6, "TBps": data[b]["kv_bytes"] / t / 1e12,
                            "pct_copy": data[b]["kv_bytes"] / t / (res["copy_TBps"] * 1e12),
                            "rel_err": err, "ok": err <= 1e-2}
        return row

    def run(todo: list[tuple], deadline: float) -> None:
        for i, cfg in enumerate(todo):
            if time.perf_counter() - t_start > deadline:
                res.setdefault("stopped_early", []).append(
                    f"at {deadline:.0f} s: {i} of {len(todo)} configs timed")
                print(res["stopped_early"][-1], flush=True)
                return
            try:
                row = time_config(cfg)
            except Exception as e:  # noqa: BLE001 - keep sweeping; the JSON says what failed
                row = {**dict(zip(KEYS, cfg)), "error": f"{type(e).__name__}: {str(e)[:200]}"}
            res["configs"].append(row)
            if i % 8 == 0:
                save()
                if cuda:
                    torch.cuda.empty_cache()

    def correct() -> list[dict]:
        return [r for r in res["configs"]
                if "error" not in r and all(r[f"b{b}"]["ok"] for b in batches)]

    def ranking(good: list[dict]) -> tuple[dict, list[dict]]:
        best = {b: min(good, key=lambda r: r[f"b{b}"]["us"]) for b in batches}
        for r in good:  # geometric mean over the batches of the time over that batch's best
            r["score"] = math.exp(statistics.fmean(
                math.log(r[f"b{b}"]["us"] / best[b][f"b{b}"]["us"]) for b in batches))
        return best, sorted(good, key=lambda r: r["score"])

    t0 = time.perf_counter()
    run(configs, args.budget_s)
    res["sweep_s"] = time.perf_counter() - t0

    if args.spreads:  # the default config, each batch at several programs per head
        res["spreads"] = []
        max_splits = -(-args.max_seq_len // default[0])
        for sp in sorted({min(int(x), max_splits) for x in args.spreads.split(",")}):
            try:
                row = time_config(default, sp)
            except Exception as e:  # noqa: BLE001
                row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["programs_per_head"] = sp
            res["spreads"].append(row)
            save()
            if "error" not in row:
                print(f"spread {sp:3d}: " + ", ".join(
                    f"b={b} {row[f'b{b}']['us']:.1f} us ({100 * row[f'b{b}']['pct_copy']:.0f}%"
                    f"{'' if row[f'b{b}']['ok'] else ' WRONG'})" for b in batches), flush=True)

    good = correct()
    res["wrong"] = [r for r in res["configs"] if "error" not in r and r not in good]
    if not good:
        save()
        print(f"no config ran correctly; JSON {out_path}")
        return

    def name(r: dict) -> str:
        return f"split {r['split']:4d} bn {r['block_n']:3d} w {r['warps']} s {r['stages']}"

    best, ranked = ranking(good)
    res["best_per_batch"] = {f"b{b}": best[b] for b in batches}
    res["best_across"] = ranked[:5]
    res["default_row"] = next((r for r in good if tuple(r[k] for k in KEYS) == default), None)
    res["total_s"] = time.perf_counter() - t_start
    save()

    print(f"\n{res['device']}, triton {res['triton']}: copy {res['copy_TBps']:.2f} TB/s (r+w); "
          f"{len(good)} configs correct of {len(res['configs'])} timed; JSON {out_path}")
    head = " | ".join(f"b={b}: us/call, TB/s, % copy" for b in batches)
    print(f"| config | {head} | score |")

    def line(tag: str, r: dict | None) -> None:
        if r is None:
            return
        cells = " | ".join(f"{r[f'b{b}']['us']:.1f}, {r[f'b{b}']['TBps']:.2f}, "
                           f"{100 * r[f'b{b}']['pct_copy']:.0f}%" for b in batches)
        print(f"| {tag}: {name(r)} | {cells} | {r.get('score', float('nan')):.3f} |")

    line("default", res["default_row"])
    for b in batches:
        line(f"best b={b}", best.get(b))
    for r in ranked[:5]:
        line("across", r)


if __name__ == "__main__":
    main()
