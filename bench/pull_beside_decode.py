"""What a same-GPU KV pull costs a real decode step, by pull method and stream priority
(issue 24: "a real decode step (batch 32) beside back-to-back 16k-token same-GPU pulls <= 15%
slower than alone; the pull alone >= 85% of copy").

The engine: pdserve's, Llama-3-8B shapes, dummy bf16 weights (bench/serving_gpu.py's
config), `--batch` requests of `--ctx` tokens decoding, timed per `engine.step()` (each step
returns once its tokens reached the host). The pull: `--tokens` tokens of KV (2 MiB blocks
of 16 tokens, random scattered ids) between two pools of the same GPU, i.e. the HBM traffic
of a cuda_ipc pull on one GPU. Methods:

- `gather`: `gather_blocks`, one launch over every block and tile (today's pull), on a
  stream of default priority, the engine on the default stream (today's worker);
- `gather+prio`: the same with the engine on a high-priority stream, the pull on the
  lowest;
- `bounded-K`: `gather_blocks(max_programs=K)`: K programs (at most K SMs) stride over
  every tile, low priority, the engine high;
- `memcpy`: one `copy_` (cudaMemcpyAsync device to device) per run of consecutive blocks,
  low priority, the engine high.

`--src-device cuda:0` (with `--device cuda:1`): the source pool on another GPU, as a cuda_ipc
pull across GPUs reads P's pool over NVLink/PCIe (issue 25; the gather runs on D's GPU, the
reference copy is the same-run copy of one contiguous tensor between the two GPUs).

`--alone-configs 'stream=1;waves=4'`: further full-grid cuts (kernels/block_copy.py
GatherConfig specs, `;`-separated) measured alone only. For every pull measured alone also:
the host time of the launching call (µs until it returns, no sync) and the device time
between CUDA events around it, which split a pull's fixed cost into host and GPU parts.

Per method: the pull alone (ms, GB/s of payload, % of the same-run copy of one contiguous
tensor of that size), then the decode step alone and beside back-to-back pulls
launched by a thread during the timed steps (median ms, slowdown %). JSON to
OUT/pull_beside_decode.json as it goes; a table last. `--tiny`: the tiny test shapes on
any device (a smoke test of this script; on CPU no streams).

Usage: python bench/pull_beside_decode.py [--out DIR] [--batch 32] [--ctx 1024]
       [--tokens 16384] [--methods gather,gather+prio,bounded-16,memcpy]
       [--src-device cuda:0 --device cuda:1]
       [--alone-configs 'stream=1;waves=4,stream=1']
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_gpu import LLAMA3_8B, TINY  # noqa: E402

BLOCK = 16
RESULTS: dict = {"methods": [], "errors": []}
OUT: Path | None = None


def save() -> None:
    if OUT is not None:
        OUT.write_text(json.dumps(RESULTS, indent=1))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def runs_of(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of runs where both ids advance by one."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


class Pull:
    """One method's pull of `ids` (src, dst block ids) between `src` and `dst` pools."""

    def __init__(self, method: str, src: torch.Tensor, dst: torch.Tensor, ids: tuple[list[int],
                 list[int]], dev: torch.device):
        self.method, self.src, self.dst = method, src, dst
        self.s = torch.tensor(ids[0], dtype=torch.int32, device=dev)
        self.d = torch.tensor(ids[1], dtype=torch.int32, device=dev)
        self.runs = runs_of(*ids)
        self.programs = int(method.split("-")[1]) if method.startswith("bounded-") else None
        from pdserve.kernels.block_copy import BlockGather, GatherConfig

        # as D's Puller does: the pools' checks and views once, a launch per pull
        # (the engine's own cut, DEFAULT_GATHER, unless a --alone-configs spec names another)
        spec = method.split(":", 1)[1] if method.startswith("full:") else ""
        self.gather = BlockGather(src, dst, GatherConfig.parse(spec) if spec else None)

    def __call__(self) -> None:
        if self.method == "memcpy":
            for s, d, n in self.runs:
                self.dst[d:d + n].copy_(self.src[s:s + n], non_blocking=True)
        else:
            self.gather(self.s, self.d, max_programs=self.programs)


class PullLoop:
    """A thread pulling back to back on `stream` until `stop()`: it launches a pull, then
    waits for the one before it (so two are in flight), counting them."""

    def __init__(self, pull: Pull, stream, on):
        import threading

        self.pull, self.stream, self.on = pull, stream, on
        self.count = 0
        self.started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prev = None
        while not self._stop.is_set():
            with self.on(self.stream):
                self.pull()
            ev = None
            if self.stream is not None:
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.started.set()
            if prev is not None:
                prev.synchronize()
            prev = ev
            self.count += 1
        if prev is not None:
            prev.synchronize()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def peer_view(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """`t` (on another GPU) as a tensor on `dev` over the same memory, peer access on: what
    D's `cuda_ipc.open_peer_pool` hands the gather, without a second process."""
    import cupy as cp

    with cp.cuda.Device(dev.index):
        if not cp.cuda.runtime.deviceCanAccessPeer(dev.index, t.device.index):
            raise RuntimeError(f"GPU {dev.index} cannot access peer GPU {t.device.index}")
        try:
            cp.cuda.runtime.deviceEnablePeerAccess(t.device.index)
        except cp.cuda.runtime.CUDARuntimeError as e:  # already enabled (by torch's copies)
            if "PeerAccessAlreadyEnabled" not in str(e):
                raise
        nbytes = t.numel() * t.element_size()
        mem = cp.cuda.UnownedMemory(t.data_ptr(), nbytes, t, device_id=dev.index)
        arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        flat = torch.from_dlpack(arr)
    if flat.device != dev or flat.data_ptr() != t.data_ptr():
        raise RuntimeError(f"DLPack wrapped {t.device} memory as {flat.device}")
    return flat.view(t.dtype).view(t.shape)


def same_bytes(dst: torch.Tensor, d: torch.Tensor, src: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether dst's blocks d hold src's blocks s bit for bit (compared on dst's device)."""
    got = dst[d.long()].view(torch.int16)
    want = src[s.to(src.device).long()].view(torch.int16).to(dst.device)
    return bool(torch.equal(got, want))


def split_cost(fn, dev: torch.device, reps: int) -> tuple[float, float]:
    """(median host µs of fn() until it returns, median device ms between CUDA events
    around it); (nan, nan) off CUDA."""
    if dev.type != "cuda":
        return float("nan"), float("nan")
    host, device = [], []
    for _ in range(reps):
        sync(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        b.record()
        b.synchronize()
        device.append(a.elapsed_time(b))
    return statistics.median(host), statistics.median(device)


def timed(fn, dev: torch.device, reps: int) -> float:
    """Median seconds of fn() to completion."""
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--src-device", default=None,
                    help="the pulled pool's device (default: --device): another GPU for a "
                    "cross-GPU pull")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--methods", default="gather,gather+prio,bounded-8,bounded-16,bounded-32,"
                    "memcpy")
    ap.add_argument("--alone-configs", default="",
                    help="';'-separated GatherConfig specs of full-grid pulls measured alone")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    src_dev = torch.device(args.src_device) if args.src_device else dev
    if src_dev.type == "cuda" and src_dev.index is None:
        src_dev = torch.device("cuda", 0)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(dev)  # the engine, the pull's launches and its streams: D's GPU
    OUT = Path(args.out) / "pull_beside_decode.json"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = TINY if args.tiny else LLAMA3_8B
    RESULTS.update(device=torch.cuda.get_device_name(dev) if cuda else "cpu",
                   torch=torch.__version__, batch=args.batch, ctx=args.ctx, tokens=args.tokens,
                   shapes="tiny" if args.tiny else "llama3-8b", dst_device=str(dev),
                   src_device=str(src_dev), cross_gpu=src_dev != dev)
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.setup import build_engine

    # the two pools of the pull first (the engine's pool is sized explicitly, beside them)
    layers, kv_heads = model_cfg["num_hidden_layers"], model_cfg["num_key_value_heads"]
    head_dim = model_cfg["hidden_size"] // model_cfg["num_attention_heads"]
    n = max(1, args.tokens // BLOCK)
    blocks = n + 64
    shape = (blocks, layers, 2, BLOCK, kv_heads, head_dim)
    src = torch.empty(shape, dtype=torch.bfloat16, device=src_dev)
    src.view(torch.int16).random_(-30000, 30000)
    if src_dev != dev:
        src = peer_view(src, dev)  # D reads P's pool in place, as through a cuda_ipc mapping
    dst = torch.zeros(shape, dtype=torch.bfloat16, device=dev)
    rng = random.Random(7)
    ids = (rng.sample(range(blocks), n), rng.sample(range(blocks), n))
    nbytes = n * src[0].numel() * src.element_size()
    RESULTS["pull_mib"] = nbytes / 2**20
    flat_a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=src_dev)
    flat_b = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    copy = (lambda a=flat_a, b=flat_b: b.copy_(a))
    copy()  # warm
    copy_s = timed(copy, dev, args.reps + 2)
    RESULTS["copy_ms"], RESULTS["copy_gbs"] = copy_s * 1e3, nbytes / copy_s / 1e9
    RESULTS["copy_host_us"], RESULTS["copy_device_ms"] = split_cost(copy, dev, args.reps + 2)
    save()

    # further full-grid cuts, alone only (the same measure as every method's "pull alone").
    # Each is warmed (compiled, clocks up), then the copy and every cut are timed in
    # interleaved rounds, so no cut pays for going first (a first cut timed alone on an
    # H100 read 82% where the same cut timed last read 88%)
    RESULTS["alone"] = []
    cuts = {}
    for spec in filter(None, args.alone_configs.split(";")):
        try:
            pull = Pull("full:" + spec, src, dst, ids, dev)
            for _ in range(3):
                pull()  # compile / warm
            sync(dev)
            cuts[spec] = pull
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            RESULTS["errors"].append({"config": spec, "error": f"{type(e).__name__}: {e}"})
            print(f"config {spec}: {type(e).__name__}: {e}", flush=True)
    if cuts:
        times: dict[str, list[float]] = {spec: [] for spec in ["<copy>", *cuts]}
        for _ in range(max(args.reps, 5)):
            for spec, fn in [("<copy>", copy), *cuts.items()]:
                times[spec].append(timed(fn, dev, 1))
        round_copy = statistics.median(times["<copy>"])
        RESULTS["alone_copy_ms"] = round_copy * 1e3
        RESULTS["alone_copy_gbs"] = nbytes / round_copy / 1e9
        for spec, pull in cuts.items():
            alone = statistics.median(times[spec])
            host_us, device_ms = split_cost(pull, dev, args.reps)
            dst.zero_()
            pull()
            exact = same_bytes(dst, pull.d, src, pull.s)
            rec = dict(config=spec, pull_ms=alone * 1e3, pull_gbs=nbytes / alone / 1e9,
                       pct_of_copy=100 * round_copy / alone, host_us=host_us,
                       device_ms=device_ms, exact=exact)
            RESULTS["alone"].append(rec)
            print(json.dumps(rec), flush=True)
        dst.zero_()
        save()
    del flat_a, flat_b, copy

    methods = [m for m in args.methods.split(",") if m]
    if not methods:  # --methods '': the pulls alone only, no engine
        report(args)
        return
    cfg_dir = Path(tempfile.mkdtemp())
    (cfg_dir / "config.json").write_text(json.dumps(model_cfg))
    need = args.batch * (args.ctx + args.steps * 4 + 64) * layers * 2 * kv_heads * head_dim * 2
    parts = build_engine(EngineConfig(
        model=str(cfg_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
        device=args.device, max_model_len=args.ctx + 512, max_num_seqs=max(args.batch, 8),
        max_num_batched_tokens=8192, enable_prefix_caching=False,
        kv_cache_memory_bytes=int(need * 1.5) + (64 << 20)), progress=False)
    engine = LLMEngine(parts)
    vocab = model_cfg["vocab_size"]
    high = torch.cuda.Stream(dev, priority=-100) if cuda else None  # clamped to the highest
    low = torch.cuda.Stream(dev, priority=100) if cuda else None  # clamped to the lowest
    plain = torch.cuda.Stream(dev) if cuda else None
    RESULTS["stream_priorities"] = torch.cuda.Stream.priority_range() if cuda else None

    def on(stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    from pdserve import SamplingParams

    def decode_steps(engine_stream, pull: Pull | None, pull_stream) -> list[float]:
        """`args.steps` timed steps of `args.batch` decoding requests; with `pull`, a thread
        pulls back to back on `pull_stream` meanwhile (two pulls in flight at most, as the
        receiver's I/O thread would launch them)."""
        gen = torch.Generator().manual_seed(0)
        sp = SamplingParams(temperature=0, max_tokens=args.steps + 16, ignore_eos=True)
        with on(engine_stream):
            if engine_stream is not None:
                engine_stream.wait_stream(torch.cuda.default_stream(dev))
            reqs = [engine.add_request(torch.randint(5, vocab - 1, (args.ctx,),
                                                     generator=gen).tolist(), sp)
                    for _ in range(args.batch)]
            while any(not r.seqs or not r.seqs[0].output_token_ids for r in reqs):
                engine.step()
            for _ in range(5):
                engine.step()
            sync(dev)
            loop = PullLoop(pull, pull_stream, on) if pull is not None else None
            if loop is not None:
                loop.started.wait(60)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            if loop is not None:
                loop.stop()
                RESULTS.setdefault("pulls_during_steps", {})[pull.method] = loop.count
            for r in reqs:
                engine.abort(r)
            while engine.has_unfinished():
                engine.step()
            sync(dev)
        return times

    for method in methods:
        try:
            pull = Pull(method, src, dst, ids, dev)
            prio = method != "gather"
            pull_stream = low if prio else plain
            engine_stream = high if prio else None
            with on(pull_stream):
                pull()  # compile / warm
            alone = timed(lambda s=pull_stream, f=pull: _on_call(on, s, f), dev, args.reps)
            host_us, device_ms = split_cost(lambda s=pull_stream, f=pull: _on_call(on, s, f),
                                            dev, args.reps)
            base = decode_steps(engine_stream, None, None)
            step_s = statistics.median(base)
            beside = decode_steps(engine_stream, pull, pull_stream)
            pulls = RESULTS["pulls_during_steps"][method]
            # the bytes the pull wrote are the source's
            exact = same_bytes(dst, pull.d, src, pull.s)
            rec = dict(method=method, pull_ms=alone * 1e3, pull_gbs=nbytes / alone / 1e9,
                       pct_of_copy=100 * RESULTS["copy_ms"] / 1e3 / alone,
                       host_us=host_us, device_ms=device_ms, step_ms_alone=step_s * 1e3,
                       step_ms_beside=statistics.median(beside) * 1e3,
                       slowdown_pct=100 * (statistics.median(beside) / step_s - 1),
                       pulls_during_steps=pulls, exact=exact, runs=len(pull.runs))
            RESULTS["methods"].append(rec)
            print(json.dumps(rec), flush=True)
            dst.zero_()
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            import traceback

            traceback.print_exc()
            RESULTS["errors"].append({"method": method, "error": f"{type(e).__name__}: {e}"})
        save()
    report(args)


def report(args: argparse.Namespace) -> None:
    where = (f"{RESULTS['src_device']} -> {RESULTS['dst_device']}" if RESULTS["cross_gpu"]
             else "same GPU")
    print(f"\n{RESULTS['device']}, {where}, {RESULTS['shapes']}, batch {args.batch} x {args.ctx} ctx; "
          f"pull {args.tokens} tokens = {RESULTS['pull_mib']:.0f} MiB; same-run copy "
          f"{RESULTS['copy_gbs']:.0f} GB/s")
    print(f"copy: host {RESULTS['copy_host_us']:.0f} µs, device {RESULTS['copy_device_ms']:.3f} ms")
    if RESULTS["alone"]:
        print(f"full-grid cuts and the copy timed in interleaved rounds (copy "
              f"{RESULTS['alone_copy_ms']:.3f} ms = {RESULTS['alone_copy_gbs']:.0f} GB/s):")
        print("| full-grid config | pull ms | GB/s | % of copy | host µs | device ms |")
        print("|---|---|---|---|---|---|")
        for r in RESULTS["alone"]:
            print(f"| {r['config']} | {r['pull_ms']:.3f} | {r['pull_gbs']:.0f} | "
                  f"{r['pct_of_copy']:.0f}% | {r['host_us']:.0f} | {r['device_ms']:.3f} |")
    print("| method | pull ms | GB/s | % of copy | host µs | device ms | step alone ms | "
          "step beside ms | slowdown |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS["methods"]:
        print(f"| {r['method']} | {r['pull_ms']:.3f} | {r['pull_gbs']:.0f} | "
              f"{r['pct_of_copy']:.0f}% | {r['host_us']:.0f} | {r['device_ms']:.3f} | "
              f"{r['step_ms_alone']:.2f} | {r['step_ms_beside']:.2f} | "
              f"{r['slowdown_pct']:+.1f}% |")


def _on_call(on, stream, fn) -> None:
    with on(stream):
        fn()


if __name__ == "__main__":
    main()
