"""KV-transfer benchmark at Llama-3-8B block size (32 layers x 2 x 16 tokens x 8 KV heads x
128 dims, bf16 = 2 MiB per block, 128 KiB per token), randomly scattered block ids in pools
of 2048 blocks. Prints a table and never asserts; JSON goes to OUT/kv_transfer.json as it
goes.

Per transport and size (1k, 4k, 16k tokens):
- kernel: one `gather_blocks` launch (what a cuda_ipc pull is) reading P's pool through a
  CUDA IPC mapping, timed with CUDA events, against a plain torch copy of ONE contiguous
  tensor of the same size between the same two GPUs in the same run ("copy"). GB/s count
  the payload once (bytes moved, not read + written);
- end to end: real P (a separate process, KVSender) and D (this process, KVReceiver): D
  reserves, P offers, until D's ARRIVED event: median latency and payload GB/s; "D-side" is
  D's own offer-received-to-done time. cuda_ipc on one GPU, across two GPUs, tcp (GPU pools
  pushed by P through pinned host memory), and shm on CPU pools (1k and 4k tokens only);
- tcp on CPU pools against the raw socket rate: rounds alternating a raw loopback
  measurement over 1, 2, 4 and 8 connections (a plain sender process, `recv_into` one
  buffer per connection) with one tcp transfer (`--tcp-connections` per P-D session);
  tcp's median and its % of raw's best median (the issue-24 bar: >= 80%);
- decode-step proxy: a fixed bf16 matmul loop on D's default stream, alone and while a
  pull loop runs on the transfer stream beside it.

With --gpu-tcp only tcp between GPU pools; `--staging 3x4,2x8` repeats it per pinned staging
config (depth x MiB), `--raw-cold` adds the raw rate of senders that each send their own
whole buffer (no cache holds it) over tcp's connection count.

`--kernel-only`: only the kernel rows (the same GPU, and GPU0->GPU1 where there are two).

Usage: python bench/kv_transfer.py [--out DIR] [--quick] [--reps N] [--cpu-only tcp,...]
       [--gpu-tcp [--staging 3x4,...]] [--raw-cold] [--tokens 4096,16384] [--kernel-only]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import select
import statistics
import sys
import time
import traceback

import torch

LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 32, 16, 8, 128
TOKENS = [1024, 4096, 16384]
RESULTS: dict = {"rows": [], "decode": [], "errors": [], "env": {}}
RAW_COLD = False  # --raw-cold: also raw over tcp's connection count, each from its own bytes
OUT_PATH = ""


def save() -> None:
    if OUT_PATH:
        with open(OUT_PATH, "w") as f:
            json.dump(RESULTS, f, indent=1)


def log(msg: str) -> None:
    print(msg, flush=True)


def section(name: str):
    """Decorator: run a section, record its failure and go on with the next."""
    def wrap(fn):
        def run(*a, **k):
            t0 = time.monotonic()
            try:
                fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - a benchmark reports, never stops
                traceback.print_exc()
                RESULTS["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}"})
            log(f"[{name}: {time.monotonic() - t0:.1f} s]")
            save()
        return run
    return wrap


def spec(num_blocks: int, dtype: torch.dtype):
    from pdserve.engine.kv_pool import KVPoolSpec

    return KVPoolSpec(num_blocks, LAYERS, BLOCK, KV_HEADS, HEAD_DIM, dtype)


def compat(dtype: torch.dtype):
    from pdserve.common.compat import PROTOCOL_VERSION, CompatRecord
    from pdserve.common.prefix import PREFIX_HASH_FUNCTION
    from pdserve.engine.kv_pool import POOL_LAYOUT

    return CompatRecord(PROTOCOL_VERSION, "bench", "c", "t", str(dtype).removeprefix("torch."),
                        BLOCK, POOL_LAYOUT, LAYERS, KV_HEADS, HEAD_DIM, 32768,
                        PREFIX_HASH_FUNCTION)


# ---- P: a separate process (CUDA IPC handles cannot be opened by their own process) -------

def _p_main(conn, device: str, num_blocks: int, shm: bool, tcp_connections: int | None,
            staging_cfg: tuple[int, int] | None = None) -> None:
    torch.set_num_threads(8)
    set_staging(staging_cfg)
    from pdserve.engine.kv_pool import KVPool
    from pdserve.kv_transfer import cuda_ipc
    from pdserve.kv_transfer.protocol import new_epoch
    from pdserve.kv_transfer.sender import KVSender

    dev = torch.device(device)
    dtype = torch.bfloat16
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pool = KVPool(spec(num_blocks, dtype), dev, shm_epoch=new_epoch() if shm else None)
    torch.manual_seed(0)
    pool.tensor.view(torch.int16).random_(-30000, 30000)  # finite bf16 bit patterns
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ep = KVSender(pool, compat(dtype), name=f"P-{device}", transfer_timeout=120.0,
                  tcp_connections=tcp_connections)
    conn.send("ready")
    while True:
        ep.events()  # drained; D's side is what is timed
        # sleep until a command or an event, as a worker's loop does (polling every 1 ms
        # took ~5% of this 2-core box from the transfer)
        if not conn.poll(0):
            select.select([conn.fileno(), ep.events_fd], [], [], 1.0)
            continue
        cmd, *args = conn.recv()
        if cmd == "stop":
            ep.close()
            pool.close()
            conn.send(None)
            return
        if cmd == "info":
            conn.send(cuda_ipc.export_pool(pool)["cuda_ipc"])
        elif cmd == "offer":
            rid, address, block_ids = args
            ep.offer(rid, address, block_ids, len(block_ids) * BLOCK, 120.0)
            conn.send(None)
        elif cmd == "checksum":
            conn.send(cuda_ipc.checksum(pool.tensor[torch.tensor(args[0], device=dev)]))


def set_staging(cfg: tuple[int, int] | None) -> None:
    """(pinned buffer bytes, buffers per connection) of the tcp plane's GPU staging, in
    this process (None: the defaults)."""
    from pdserve.kv_transfer import staging

    if cfg is not None:
        staging.STAGING_BYTES, staging.STAGING_DEPTH = cfg


class P:
    tcp_connections: int | None = None  # --tcp-connections (None: KVSender's default)
    staging: tuple[int, int] | None = None  # --staging (None: the defaults)

    def __init__(self, device: str, num_blocks: int, shm: bool = False):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_p_main, args=(child, device, num_blocks, shm,
                                                      P.tcp_connections, P.staging),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(180) or self.conn.recv() != "ready":
            raise RuntimeError(f"P on {device} did not start")
        self.num_blocks = num_blocks

    def call(self, *cmd):
        self.conn.send(cmd)
        if not self.conn.poll(120):
            raise TimeoutError(f"P did not answer {cmd[0]}")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.call("stop")
        except (TimeoutError, OSError, EOFError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# ---- timing helpers --------------------------------------------------------------------------

def event_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median ms of fn() bracketed by events on `device`'s current stream."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def id_sets(rng: random.Random, n: int, src_blocks: int, dst_blocks: int, k: int, device):
    """k random (src ids, dst ids) pairs: distinct ids, scattered over both pools."""
    out = []
    for _ in range(k):
        s = torch.tensor(rng.sample(range(src_blocks), n), dtype=torch.int32, device=device)
        d = torch.tensor(rng.sample(range(dst_blocks), n), dtype=torch.int32, device=device)
        out.append((s, d))
    return out


def row(**fields) -> None:
    RESULTS["rows"].append(fields)
    log("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in fields.items()))
    save()


# ---- sections -----------------------------------------------------------------------------------

@section("kernel")
def bench_kernel(info: dict, p_dev: int, d_dev: int, d_pool, tokens: list[int], reps: int) -> None:
    """One gather launch through the mapping vs one contiguous copy, same GPUs, same bytes.
    The gather as D's Puller runs it: a BlockGather of the two pools made once (DEFAULT_GATHER),
    each pull a launch."""
    from pdserve.kernels.block_copy import BlockGather
    from pdserve.kv_transfer import cuda_ipc

    dev = torch.device("cuda", d_dev)
    src = cuda_ipc.open_peer_pool(info, dev)
    try:
        pull = BlockGather(src, d_pool.tensor)
        rng = random.Random(1)
        block_bytes = d_pool.tensor[0].numel() * d_pool.tensor.element_size()
        for n_tok in tokens:
            n = n_tok // BLOCK
            nbytes = n * block_bytes
            sets = id_sets(rng, n, src.shape[0], d_pool.tensor.shape[0], 4, dev)
            it = iter(range(10**9))

            def gather(sets=sets, it=it):
                s, d = sets[next(it) % len(sets)]
                pull(s, d)

            g_ms = event_ms(gather, dev, reps)
            a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{p_dev}").random_()
            b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            c_ms = event_ms(lambda a=a, b=b: b.copy_(a), dev, reps)
            del a, b
            torch.cuda.empty_cache()
            where = "same GPU" if p_dev == d_dev else f"GPU{p_dev}->GPU{d_dev}"
            row(kind="kernel", transport="cuda_ipc", where=where, tokens=n_tok,
                mib=nbytes / 2**20, gather_ms=g_ms, gather_gbs=nbytes / g_ms / 1e6,
                copy_ms=c_ms, copy_gbs=nbytes / c_ms / 1e6, pct_of_copy=100 * c_ms / g_ms)
    finally:
        cuda_ipc.close_peer_pool(src)


def transfer_once(rx, p: P, rid: str, src: list[int], dst: list[int]):
    """Reserve on D, offer on P, wait for D's event: (ms from the offer, the event)."""
    rx.reserve(rid, dst, 300.0)
    t0 = time.perf_counter()
    p.call("offer", rid, rx.address, src)
    ev, give_up = None, time.monotonic() + 60
    while ev is None:
        for e in rx.events():
            if e.rid == rid:
                ev = e
        if ev is None:
            if time.monotonic() > give_up:
                raise TimeoutError(f"{rid}: no event on D in 60 s")
            # sleep until D's I/O thread announces an event, as a worker's loop does
            # (a polling loop would take a core from the transfer on small hosts)
            select.select([rx.events_fd], [], [], 0.1)
    ms = (time.perf_counter() - t0) * 1e3
    from pdserve.kv_transfer.states import EventKind

    if ev.kind is not EventKind.ARRIVED:
        raise RuntimeError(f"{rid}: {ev.kind.value} ({ev.reason})")
    return ms, ev


def bit_exact(rx, p: P, src: list[int], dst: list[int]) -> bool:
    """D's blocks `dst` against P's own checksum of `src`."""
    from pdserve.kv_transfer import cuda_ipc

    got = cuda_ipc.checksum(rx.pool.tensor[torch.tensor(dst, device=rx.pool.device)])
    return got == p.call("checksum", src)


@section("e2e")
def bench_e2e(rx, p: P, where: str, tokens: list[int], reps: int, d_blocks: int,
              cover: bool = False) -> None:
    """Reserve on D, offer on P, wait for ARRIVED: latency of whole transfers, one at a time.
    `cover`: untimed transfers first read every block of P's pool once (shm: D's mapping of
    P's file is then fully faulted in, as for a D that has pulled from this P for a while;
    without it the timed transfers still fault in the pages they read first)."""
    rng = random.Random(2)
    block_bytes = rx.block_bytes
    for n_tok in tokens:
        n = n_tok // BLOCK
        lat, dside, exact = [], [], None
        order = list(range(p.num_blocks))
        rng.shuffle(order)
        covering = [order[k:k + n] for k in range(0, len(order), n)] if cover else []
        for i in range(-len(covering), reps + 1):  # i <= 0 warm up (handshake, compile)
            src = covering[i + len(covering)][:n] if i < 0 else rng.sample(range(p.num_blocks), n)
            dst = rng.sample(range(d_blocks), len(src))
            ms, ev = transfer_once(rx, p, f"{where}-{n_tok}-{i}", src, dst)
            if i > 0:
                lat.append(ms)
                dside.append(ev.seconds * 1e3)
            if i == reps:  # check the last one's bytes against P's own checksum
                exact = bit_exact(rx, p, src, dst)
        ms = statistics.median(lat)
        row(kind="e2e", transport=ev.transport, where=where, tokens=n_tok,
            mib=n * block_bytes / 2**20, e2e_ms=ms, e2e_gbs=n * block_bytes / ms / 1e6,
            d_side_ms=statistics.median(dside), reps=reps, bit_exact=exact)


@section("decode_proxy")
def bench_decode_proxy(info: dict, d_dev: int, d_pool, where: str) -> None:
    """bf16 matmul loop (a decode step's MLP at batch 256) on D's default stream, alone and
    with a 16k-token pull loop on a transfer stream beside it."""
    from pdserve.kernels.block_copy import gather_blocks
    from pdserve.kv_transfer import cuda_ipc

    dev = torch.device("cuda", d_dev)
    src = cuda_ipc.open_peer_pool(info, dev)
    try:
        with torch.cuda.device(dev):
            x = torch.randn(256, 4096, dtype=torch.bfloat16, device=dev)
            w = torch.randn(4096, 14336, dtype=torch.bfloat16, device=dev)
            out = torch.empty(256, 14336, dtype=torch.bfloat16, device=dev)
            steps = 50

            def decode_loop():
                for _ in range(steps):
                    torch.matmul(x, w, out=out)

            alone = event_ms(decode_loop, dev, 5)
            s, d = id_sets(random.Random(3), 1024, src.shape[0], d_pool.tensor.shape[0], 1,
                           dev)[0]
            stream = torch.cuda.Stream(device=dev)
            with torch.cuda.stream(stream):
                gather_blocks(src, s, d_pool.tensor, d)  # warm
            pull = event_ms(lambda: gather_blocks(src, s, d_pool.tensor, d), dev, 3)
            n_pulls = math.ceil(alone / pull) + 2  # the pulls outlast the decode loop
            beside = []
            for _ in range(3):
                torch.cuda.synchronize(dev)
                with torch.cuda.stream(stream):
                    for _ in range(n_pulls):
                        gather_blocks(src, s, d_pool.tensor, d)
                beside.append(event_ms(decode_loop, dev, 1, warmup=0))
                torch.cuda.synchronize(dev)
            with_pull = statistics.median(beside)
        rec = dict(where=where, step_ms_alone=alone / steps, step_ms_with_pull=with_pull / steps,
                   slowdown_pct=100 * (with_pull / alone - 1), pull_16k_ms=pull)
        RESULTS["decode"].append(rec)
        log(f"  decode proxy {where}: {rec}")
    finally:
        cuda_ipc.close_peer_pool(src)


@section("cpu_copy")
def bench_cpu_copy(tokens: list[int]) -> None:
    block_bytes = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2
    for n_tok in tokens:
        nbytes = n_tok // BLOCK * block_bytes
        a = torch.empty(nbytes, dtype=torch.uint8).random_()
        b = torch.empty_like(a)
        b.copy_(a)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        row(kind="copy", transport="cpu memcpy", where="host", tokens=n_tok,
            mib=nbytes / 2**20, copy_ms=ms, copy_gbs=nbytes / ms / 1e6)


def table() -> None:
    log("\n| kind | transport | where | tokens | MiB | gather GB/s | copy GB/s | % of copy "
        "| e2e ms | e2e GB/s | % of raw | D-side ms | exact |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS["rows"]:
        def f(k, fmt="{:.1f}", r=r):
            return fmt.format(r[k]) if isinstance(r.get(k), float) else str(r.get(k, ""))
        log(f"| {r['kind']} | {r['transport']} | {r['where']} | {r['tokens']} "
            f"| {f('mib', '{:.0f}')} | {f('gather_gbs')} | {f('copy_gbs')} | {f('pct_of_copy')} "
            f"| {f('e2e_ms', '{:.2f}')} | {f('e2e_gbs')} | {f('pct_of_raw', '{:.0f}')} "
            f"| {f('d_side_ms', '{:.2f}')} "
            f"| {r.get('bit_exact', '')} |")
    for d in RESULTS["decode"]:
        log(f"| decode proxy | {d['where']} | step {d['step_ms_alone']:.3f} ms alone, "
            f"{d['step_ms_with_pull']:.3f} ms beside a pull loop ({d['slowdown_pct']:+.1f}%) |")
    for e in RESULTS["errors"]:
        log(f"| ERROR | {e['section']} | {e['error'][:200]} |")


@section("gpu_kernels")
def bench_gpu_kernels(n_gpu: int, tokens: list[int], pool_blocks: int) -> None:
    """`bench_kernel` alone: the same GPU, then GPU0->GPU1 where there are two (issue 25)."""
    from pdserve.engine.kv_pool import KVPool

    p = P("cuda:0", pool_blocks)
    try:
        info = p.call("info")
        for d_dev in sorted({0, 1 if n_gpu >= 2 else 0}):
            pool = KVPool(spec(pool_blocks, torch.bfloat16), torch.device("cuda", d_dev))
            bench_kernel(info, 0, d_dev, pool, tokens, 20)
            del pool
            torch.cuda.empty_cache()
    finally:
        p.stop()


@section("gpu")
def bench_gpu(n_gpu: int, tokens: list[int], pool_blocks: int, reps: int) -> None:
    import triton

    from pdserve.engine.kv_pool import KVPool
    from pdserve.kv_transfer.receiver import KVReceiver

    RESULTS["env"]["triton"] = triton.__version__
    dt = torch.bfloat16
    p = P("cuda:0", pool_blocks)
    receivers = []
    try:
        info = p.call("info")
        pool0 = KVPool(spec(pool_blocks, dt), torch.device("cuda:0"))
        pool1 = KVPool(spec(pool_blocks, dt), torch.device("cuda:1")) if n_gpu >= 2 else None
        bench_kernel(info, 0, 0, pool0, tokens, 20)
        if pool1 is not None:
            bench_kernel(info, 0, 1, pool1, tokens, 20)
        rx0 = KVReceiver(pool0, compat(dt), transports=("cuda_ipc",), transfer_timeout=300)
        receivers.append(rx0)
        bench_e2e(rx0, p, "same GPU", tokens, reps, pool_blocks)
        if pool1 is not None:
            rx1 = KVReceiver(pool1, compat(dt), transports=("cuda_ipc",), transfer_timeout=300)
            receivers.append(rx1)
            bench_e2e(rx1, p, "GPU0->GPU1", tokens, reps, pool_blocks)
        rxt = KVReceiver(pool1 or pool0, compat(dt), transports=("tcp",), transfer_timeout=300)
        receivers.append(rxt)
        bench_e2e(rxt, p, "GPU0->GPU1" if pool1 else "same GPU", tokens, 3, pool_blocks)
        bench_decode_proxy(info, 0, pool0, "same GPU")
        if pool1 is not None:
            bench_decode_proxy(info, 1, pool1, "GPU0->GPU1")
    finally:
        for rx in receivers:
            rx.close()
        p.stop()


def main() -> None:
    global OUT_PATH, RAW_COLD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/kv_bench"))
    ap.add_argument("--quick", action="store_true", help="small pools and sizes (smoke test)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tcp-connections", type=int, default=None,
                    help="P's tcp data connections per D (default: KVSender's, min(8, cores))")
    ap.add_argument("--gpu-tcp", action="store_true",
                    help="only tcp between GPU pools against the raw socket rate")
    ap.add_argument("--cpu-only", default="", help="comma-separated subset of copy,raw,shm,tcp:"
                    " only these CPU sections (and no GPU ones)")
    ap.add_argument("--staging", default="",
                    help="GPU tcp: comma-separated pinned staging configs DEPTHxMIB (e.g. "
                    "3x4,2x8): the --gpu-tcp section once per config (default: the plane's)")
    ap.add_argument("--raw-cold", action="store_true",
                    help="tcp sections: also the raw rate over tcp's connection count with "
                    "each connection sending its own buffer of its whole size")
    ap.add_argument("--kernel-only", action="store_true",
                    help="only the gather kernel through the IPC mapping vs the same-run copy "
                    "(same GPU, and GPU0->GPU1 where there are two)")
    ap.add_argument("--tokens", default="", help="comma-separated sizes (default 1024,4096,"
                    "16384)")
    args = ap.parse_args()
    RAW_COLD = args.raw_cold
    P.tcp_connections = args.tcp_connections
    os.makedirs(args.out, exist_ok=True)
    OUT_PATH = os.path.join(args.out, "kv_transfer.json")
    logging_setup()
    tokens = [64, 256] if args.quick else TOKENS
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    pool_blocks = 64 if args.quick else 2048
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    RESULTS["env"] = {"torch": torch.__version__, "gpus": [
        torch.cuda.get_device_name(i) for i in range(n_gpu)], "pool_blocks": pool_blocks,
        "block_mib": 2, "bytes_counted": "payload once (not read + written)"}
    save()
    only = set(filter(None, args.cpu_only.split(",")))
    if args.gpu_tcp:
        configs = [(int(float(mib) * 2**20), int(depth)) for depth, mib in
                   (c.split("x") for c in args.staging.split(",") if c)]
        if configs:
            bench_gpu_tcp_sweep(tokens, max(tokens) // BLOCK + 64, args.reps, configs)
        else:
            bench_gpu_tcp_vs_raw(tokens, max(tokens) // BLOCK + 64, args.reps)
        table()
        return
    if n_gpu and args.kernel_only:
        bench_gpu_kernels(n_gpu, tokens, pool_blocks)
        table()
        return
    if n_gpu and not only:
        bench_gpu(n_gpu, tokens, pool_blocks, args.reps)
    only = only or {"copy", "raw", "shm", "tcp"}
    # CPU pools: shm (a /dev/shm file on P's side) at 1k and 4k tokens; tcp at every size,
    # in rounds alternating with the raw socket rate (loopback: this host's ceiling for any
    # TCP plane), so that load from elsewhere on a shared host hits both alike
    shm_tokens = tokens[:2] if "shm" in only else []
    cpu_blocks = max(tokens) // BLOCK + 64
    if "copy" in only:
        bench_cpu_copy(tokens[:2])
    if "raw" in only and "tcp" not in only:
        bench_raw_tcp(tokens[1:])
    if shm_tokens:
        bench_cpu(shm_tokens, cpu_blocks, args.reps)
    if "tcp" in only:
        bench_tcp_vs_raw(tokens, cpu_blocks, args.reps)
    table()


@section("cpu_e2e")
def bench_cpu(shm_tokens: list[int], blocks: int, reps: int) -> None:
    from pdserve.engine.kv_pool import KVPool
    from pdserve.kv_transfer.receiver import KVReceiver

    p = P("cpu", blocks, shm=True)
    rx = None
    try:
        pool = KVPool(spec(blocks, torch.bfloat16), torch.device("cpu"))
        rx = KVReceiver(pool, compat(torch.bfloat16), transports=("shm",), transfer_timeout=300)
        bench_e2e(rx, p, "host (CPU pools)", shm_tokens, reps, blocks)
        # again, D's mapping of P's whole pool faulted in first
        bench_e2e(rx, p, "host (CPU pools), mapping warm", shm_tokens, reps, blocks, cover=True)
    finally:
        if rx is not None:
            rx.close()
        p.stop()


@section("tcp_vs_raw")
def bench_tcp_vs_raw(tokens: list[int], blocks: int, rounds: int) -> None:
    """tcp between CPU pools (real P and D processes, random block ids) against the raw
    socket rate, in rounds: each round measures raw over 1, 2, 4 and 8 connections once,
    then one tcp transfer. Rows: raw's best median over the connection counts, and tcp's
    median with its % of that (the last transfer checked bit-exact)."""
    _tcp_vs_raw(tokens, blocks, rounds, "cpu")


def bench_gpu_tcp_sweep(tokens: list[int], blocks: int, rounds: int,
                        configs: list[tuple[int, int]]) -> None:
    """bench_gpu_tcp_vs_raw once per staging config (P restarted, D's receiver anew)."""
    for cfg in configs:
        P.staging = cfg
        set_staging(cfg)
        log(f"staging: {cfg[1]} x {cfg[0] / 2**20:g} MiB pinned buffers per connection")
        bench_gpu_tcp_vs_raw(tokens, blocks, rounds)


@section("gpu_tcp_vs_raw")
def bench_gpu_tcp_vs_raw(tokens: list[int], blocks: int, rounds: int) -> None:
    """The same between GPU pools on one GPU over loopback (`--gpu-tcp`): P stages its
    blocks through pinned host buffers, D scatters them back with H2D copies."""
    _tcp_vs_raw(tokens, blocks, rounds, "cuda:0")


def _tcp_vs_raw(tokens: list[int], blocks: int, rounds: int, device: str) -> None:
    from pdserve.engine.kv_pool import KVPool
    from pdserve.kv_transfer import staging
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.tcp_send import default_connections

    p, raw, rx = P(device, blocks), RawSender(), None
    rng = random.Random(4)
    pools = "CPU pools" if device == "cpu" else "GPU pools"
    try:
        pool = KVPool(spec(blocks, torch.bfloat16), torch.device(device))
        rx = KVReceiver(pool, compat(torch.bfloat16), transports=("tcp",), transfer_timeout=300)
        conns = P.tcp_connections or default_connections()
        for n_tok in tokens:
            n = n_tok // BLOCK
            nbytes = n * rx.block_bytes
            per: dict[int, list[float]] = {c: [] for c in (1, 2, 4, 8)}
            cold: list[float] = []
            lat, dside, exact = [], [], None
            for i in range(rounds + 1):  # round 0 warms up (handshake, connections)
                if i > 0:
                    for c in per:
                        per[c].append(raw_tcp_gbs(nbytes, c, raw))
                    if RAW_COLD:
                        cold.append(raw_tcp_gbs(nbytes, conns, raw, cold=True))
                src, dst = rng.sample(range(blocks), n), rng.sample(range(blocks), n)
                ms, ev = transfer_once(rx, p, f"tcp-{n_tok}-{i}", src, dst)
                if i > 0:
                    lat.append(ms)
                    dside.append(ev.seconds * 1e3)
                if i == rounds:
                    exact = bit_exact(rx, p, src, dst)
            med = {c: statistics.median(v) / 1e9 for c, v in per.items()}
            best = max(med.values())
            row(kind="raw", transport="tcp socket", where="loopback", tokens=n_tok,
                mib=nbytes / 2**20, copy_gbs=best,
                per_connections=", ".join(f"{c}: {g:.2f}" for c, g in med.items()))
            if cold:
                row(kind="raw", transport="tcp socket", tokens=n_tok, mib=nbytes / 2**20,
                    where=f"loopback, {conns} connections, each sending its own bytes",
                    copy_gbs=statistics.median(cold) / 1e9)
            ms = statistics.median(lat)
            where = pools if device == "cpu" else f"{pools}, staging {staging.STAGING_DEPTH} " \
                f"x {staging.STAGING_BYTES / 2**20:g} MiB"
            row(kind="e2e", transport="tcp", where=f"host ({where}), {conns} connections",
                tokens=n_tok, mib=nbytes / 2**20, e2e_ms=ms, e2e_gbs=nbytes / ms / 1e6,
                pct_of_raw=100 * nbytes / ms / 1e6 / best, d_side_ms=statistics.median(dside),
                reps=rounds, bit_exact=exact,
                all_gbs=", ".join(f"{nbytes / t / 1e6:.2f}" for t in lat))
    finally:
        if rx is not None:
            rx.close()
        raw.stop()
        p.stop()


def _raw_sender(conn) -> None:
    """Child process kept for the run: per measurement, one connection per size to the
    port it is sent, then that many bytes on each after "go": from one 8 MiB buffer that
    every connection sends again and again (it stays in the host's caches), or with
    `cold`, each connection from its own buffer of its whole size (as a transfer's bytes,
    which no cache holds)."""
    import socket
    import threading

    warm = memoryview(bytearray(8 << 20))

    def send(sock, n: int, buf) -> None:
        off = 0
        while off < n:
            k = min(n - off, len(buf) - off % len(buf))
            sock.sendall(buf[off % len(buf):off % len(buf) + k])
            off += k
        sock.close()

    while (job := conn.recv()) is not None:
        port, sizes, cold = job
        bufs = [warm] * len(sizes)
        if cold:
            bufs = []
            for n in sizes:
                b = bytearray(n)
                b[::4096] = b"\x01" * len(range(0, n, 4096))  # every page its own
                bufs.append(memoryview(b))
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in sizes]
        conn.recv()  # go
        threads = [threading.Thread(target=send, args=(s, n, b))
                   for s, n, b in zip(socks, sizes, bufs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send("done")


class RawSender:
    """The plain sender process of the raw measurements (spawned once, not per one)."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_raw_sender, args=(child,), daemon=True)
        self.proc.start()

    def stop(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def raw_tcp_gbs(nbytes: int, conns: int, sender: RawSender, cold: bool = False) -> float:
    """Bytes/s of a plain sender process and a receiver (recv_into one buffer per
    connection, a thread each) moving `nbytes` over `conns` loopback connections."""
    import socket
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(conns)
    sizes = [nbytes // conns + (1 if i < nbytes % conns else 0) for i in range(conns)]
    sender.conn.send((lsock.getsockname()[1], sizes, cold))
    socks = [lsock.accept()[0] for _ in sizes]
    lsock.close()
    bufs = [memoryview(bytearray(n)) for n in sizes]  # touched: no page faults in the run

    def recv(sock, buf) -> None:
        got = 0
        while got < len(buf):
            k = sock.recv_into(buf[got:])
            if not k:
                raise ConnectionError("raw sender closed early")
            got += k
        sock.close()

    threads = [threading.Thread(target=recv, args=(s, b)) for s, b in zip(socks, bufs)]
    t0 = time.perf_counter()
    sender.conn.send("go")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if not sender.conn.poll(30) or sender.conn.recv() != "done":
        raise RuntimeError("the raw sender did not finish")
    return nbytes / dt


@section("raw_tcp")
def bench_raw_tcp(tokens: list[int]) -> None:
    """The same-run ceiling for a TCP data plane on this host: the best of 1/2/4/8
    connections (median of 3 each) moving the same bytes as a transfer of `tokens`."""
    block_bytes = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 2
    sender = RawSender()
    try:
        for n_tok in tokens:
            nbytes = n_tok // BLOCK * block_bytes
            best, per = 0.0, {}
            for conns in (1, 2, 4, 8):
                rate = statistics.median(raw_tcp_gbs(nbytes, conns, sender) for _ in range(3))
                per[conns] = rate / 1e9
                best = max(best, rate)
            row(kind="raw", transport="tcp socket", where="loopback", tokens=n_tok,
                mib=nbytes / 2**20, copy_gbs=best / 1e9,
                per_connections=", ".join(f"{c}: {g:.2f}" for c, g in per.items()))
    finally:
        sender.stop()


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                        format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    main()
