"""Where a pinned-staged tcp stream between GPU pools loses its time (issue 24): plain
sockets, no pdserve protocol, `--conns` connections over loopback between a sender and a
receiver process on one GPU, each connection moving its share of `--mib` MiB in chunks of
`--chunk-mib` through a ring of `--depth` pinned buffers:

- `raw`: no GPU at all: the sender sends its pinned buffers as they are, the receiver
  receives into its ring;
- `send`: the sender first copies each chunk out of a GPU tensor (device to host, on its
  connection's stream, depth - 1 chunks ahead); the receiver as in raw;
- `recv`: the receiver copies each chunk into a GPU tensor (host to device) while the next
  arrives; the sender as in raw;
- `both`: the two (what the tcp plane between GPU pools does, less its protocol).

`--api torch`: each copy a non-blocking `copy_` of tensor slices and a new torch Event;
`--api driver`: `cudaMemcpyAsync`-like driver calls and reused blocking-sync events
(kv_transfer/cuda_driver.py). Both may be given (comma-separated).

Per case: GB/s, and the slowest connection thread's seconds spent waiting for copies,
launching them, and in the socket call. Without CUDA only `raw` runs (a smoke test).
JSON to OUT/tcp_staging_probe.json; a table last.

Usage: python bench/tcp_staging_probe.py [--mib 2048] [--conns 8] [--chunk-mib 1,8]
       [--depth 3] [--modes raw,send,recv,both] [--api torch,driver] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import threading
import time

import torch

CUDA = torch.cuda.is_available()


def _ring(chunk: int, depth: int) -> list[torch.Tensor]:
    return [torch.empty(chunk, dtype=torch.uint8, pin_memory=CUDA) for _ in range(depth)]


def _worker(role: str, conn, cfg: dict) -> None:
    if CUDA:
        torch.cuda.set_device(0)
    mib, conns, chunk, depth, gpu = (cfg["mib"], cfg["conns"], cfg["chunk"], cfg["depth"],
                                     cfg["mode"] in ("both", "send" if role == "S" else "recv"))
    share = mib * 2**20 // conns
    dev_mem = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda") if gpu else None
    if dev_mem is not None:
        dev_mem.random_(0, 255)
    rings = [_ring(chunk, depth) for _ in range(conns)]
    streams = [torch.cuda.Stream() if gpu else None for _ in range(conns)]
    if CUDA:
        torch.cuda.synchronize()
    if role == "R":
        lsock = socket.create_server(("127.0.0.1", 0), backlog=conns)
        conn.send(lsock.getsockname()[1])
        socks = [lsock.accept()[0] for _ in range(conns)]
    else:
        port = conn.recv()
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    stats = [dict(wait=0.0, launch=0.0, sock=0.0) for _ in range(conns)]
    driver = cfg["api"] == "driver"
    if driver:
        from pdserve.kv_transfer import cuda_driver

    def run(i: int) -> None:
        sock, ring, stream, st = socks[i], rings[i], streams[i], stats[i]
        views = [memoryview(b.numpy()) for b in ring]
        events: list = [None] * depth
        base = i * share
        offs = list(range(0, share, chunk))
        if driver and gpu:
            cuda_driver.make_current(0)
            events = [cuda_driver.Event(0) for _ in range(depth)]
            handle, dev_ptr = stream.cuda_stream, dev_mem.data_ptr() + base
            host_ptrs = [b.data_ptr() for b in ring]

        def copy(j: int) -> None:
            k = j % depth
            n = min(chunk, share - offs[j])
            t = time.perf_counter()
            if events[k] is not None:
                events[k].synchronize()
            t1 = time.perf_counter()
            if driver:
                if role == "S":
                    cuda_driver.copy_to_host(host_ptrs[k], dev_ptr + offs[j], n, handle)
                else:
                    cuda_driver.copy_to_device(dev_ptr + offs[j], host_ptrs[k], n, handle)
                events[k].record(handle)
            else:
                with torch.cuda.stream(stream):
                    src = dev_mem[base + offs[j]:base + offs[j] + n]
                    if role == "S":
                        ring[k][:n].copy_(src, non_blocking=True)
                    else:
                        src.copy_(ring[k][:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                events[k] = ev
            st["wait"] += t1 - t
            st["launch"] += time.perf_counter() - t1

        if role == "S" and gpu:
            for j in range(min(depth - 1, len(offs))):
                copy(j)
        for j, off in enumerate(offs):
            n = min(chunk, share - off)
            k = j % depth
            if role == "S":
                if gpu:
                    if j + depth - 1 < len(offs):
                        copy(j + depth - 1)
                    t = time.perf_counter()
                    events[k].synchronize()
                    st["wait"] += time.perf_counter() - t
                t = time.perf_counter()
                sock.sendall(views[k][:n])
                st["sock"] += time.perf_counter() - t
            else:
                if gpu and events[k] is not None:
                    t = time.perf_counter()
                    events[k].synchronize()
                    st["wait"] += time.perf_counter() - t
                t = time.perf_counter()
                view = views[k][:n]
                while len(view):
                    got = sock.recv_into(view, len(view), socket.MSG_WAITALL)
                    if not got:
                        raise ConnectionError("closed")
                    view = view[got:]
                st["sock"] += time.perf_counter() - t
                if gpu:
                    copy(j)
        for ev in events:
            if ev is not None:
                ev.synchronize()

    conn.recv()  # go
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.send((time.perf_counter() - t0, stats))
    for s in socks:
        s.close()


def case(cfg: dict) -> dict:
    ctx = mp.get_context("spawn")
    ends, procs = {}, []
    for role in ("R", "S"):
        ends[role], child = ctx.Pipe()
        procs.append(ctx.Process(target=_worker, args=(role, child, cfg), daemon=True))
        procs[-1].start()
    ends["S"].send(ends["R"].recv())  # the port
    time.sleep(1.0)  # both connected and idle
    for role in ("R", "S"):
        ends[role].send("go")
    out = {role: ends[role].recv() for role in ("S", "R")}
    for p in procs:
        p.join(30)
    secs = out["R"][0]
    res = dict(cfg, gbs=cfg["mib"] * 2**20 / secs / 1e9, seconds=secs)
    for role in ("S", "R"):
        st = out[role][1]
        res[role] = {k: round(max(s[k] for s in st), 4) for k in ("wait", "launch", "sock")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--chunk-mib", default="1,8")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--modes", default="raw,send,recv,both")
    ap.add_argument("--api", default="torch")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    name = torch.cuda.get_device_name(0) if CUDA else "no GPU"
    modes = args.modes.split(",") if CUDA else ["raw"]
    path = os.path.join(args.out, "tcp_staging_probe.json")
    for chunk in [float(c) for c in args.chunk_mib.split(",")]:
        for mode, api in [(m, a) for m in modes for a in args.api.split(",")
                          if m != "raw" or a == args.api.split(",")[0]]:
            cfg = dict(mib=args.mib, conns=args.conns, chunk=int(chunk * 2**20),
                       depth=args.depth, mode=mode, api=api)
            r = case(cfg)
            rows.append(r)
            print(json.dumps(r), flush=True)
            with open(path, "w") as f:
                json.dump({"gpu": name, "rows": rows}, f, indent=1)
    print(f"\n{name}, {args.mib} MiB over {args.conns} connections, "
          f"ring depth {args.depth}; seconds: the slowest connection thread's")
    print("| chunk MiB | mode | copies | GB/s | S wait / launch / sock s | R wait / launch / sock "
          "s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s, q = r["S"], r["R"]
        print(f"| {r['chunk'] / 2**20:g} | {r['mode']} | {r['api']} | {r['gbs']:.1f} | "
              f"{s['wait']:.3f} / "
              f"{s['launch']:.3f} / {s['sock']:.3f} | {q['wait']:.3f} / {q['launch']:.3f} / "
              f"{q['sock']:.3f} |")


if __name__ == "__main__":
    main()
