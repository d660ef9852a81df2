"""Real P and D processes for KV-transfer tests: each owns a CPU pool, a block manager and a
transfer endpoint, and obeys commands from the test over a multiprocessing pipe.

P fills blocks with seeded random data and offers them; D reserves blocks and reports what
arrived. Both free blocks exactly as a worker would: D on a failed, expired or cancelled
reservation (and after the test reads what arrived), P on every terminal event.

tcp options: P's `tcp_connections` (data connections per session); D's `data_port` (its
data plane's port; the "data_port" command says which it listens on); P's `stall_push`: True,
P accepts D's SEND but never pushes; "mid_block", for requests whose id starts with
"stall", P sends a batch header and half a block, then hangs until the connection is shut
down (a P stalled or frozen mid-transfer). `batch_bytes` (P) and `staging_bytes` (both; GPU
pools) shrink the batches and pinned buffers so that small test blocks span many of them;
`staging_depth` (both) sets the pinned buffers per connection.
The "threads" command lists live thread names; "readers" the names of D's live tcp reader
threads, and "readers_at" those alive when each request's event was drained.

GPU options (tests/kv_transfer/test_cuda_ipc.py): `device` ("cuda:1") places the pool on a
GPU; D's `busy` (its engine "runs steps" throughout) with `pull_programs` bounds its pulls;
P's `poison_on_release` overwrites its blocks with NaN the moment D releases them;
P's `corrupt_cuda_ipc` ("handle" or "canary") breaks its registration to force a downgrade.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass

SPEC = dict(num_blocks=256, num_layers=2, block_size=16, num_kv_heads=2, head_dim=16)


def compat(**overrides):
    from pdserve.common.compat import PROTOCOL_VERSION, CompatRecord
    from pdserve.common.prefix import PREFIX_HASH_FUNCTION
    from pdserve.engine.kv_pool import POOL_LAYOUT

    fields = dict(protocol_version=PROTOCOL_VERSION, model_id="test", config_hash="c",
                  tokenizer_hash="t", dtype="float32", block_size=SPEC["block_size"],
                  pool_layout=POOL_LAYOUT, num_layers=SPEC["num_layers"],
                  num_kv_heads=SPEC["num_kv_heads"], head_dim=SPEC["head_dim"],
                  max_model_len=4096, prefix_hash=PREFIX_HASH_FUNCTION)
    fields.update(overrides)
    return CompatRecord(**fields)


def block_data(seed: int, num_blocks: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, SPEC["num_layers"], 2, SPEC["block_size"], SPEC["num_kv_heads"],
             SPEC["head_dim"])
    return torch.randn(shape, generator=g)


def digest(t) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _main(role: str, conn, opts: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from pdserve.engine.block_manager import BlockManager
    from pdserve.engine.kv_pool import KVPool, KVPoolSpec
    from pdserve.kv_transfer import staging, tcp_send
    from pdserve.kv_transfer.protocol import new_epoch
    from pdserve.kv_transfer.states import EventKind

    if "batch_bytes" in opts:
        tcp_send.BATCH_BYTES = opts["batch_bytes"]
    if "staging_bytes" in opts:
        staging.STAGING_BYTES = opts["staging_bytes"]
    if "staging_depth" in opts:
        staging.STAGING_DEPTH = opts["staging_depth"]
    spec = KVPoolSpec(**SPEC, dtype=torch.float32)
    device = torch.device(opts.get("device", "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pool = KVPool(spec, device, shm_epoch=new_epoch() if opts.get("shm") else None)
    bm = BlockManager(spec.num_blocks, spec.block_size, enable_prefix_caching=False)
    tables: dict[str, list[int]] = {}
    arrived: dict[str, float] = {}
    log: list[tuple[str, str, str]] = []
    readers_at: dict[str, list[str]] = {}

    def reader_ids() -> list[str]:  # thread names are unique (idents are reused)
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("kv-tcp-reader"))
    c = compat(**opts.get("compat", {}))
    if role == "D":
        from pdserve.kv_transfer.receiver import KVReceiver

        ep = KVReceiver(pool, c, internal_token=opts.get("token", "tok"),
                        transfer_timeout=opts.get("transfer_timeout", 30.0),
                        transports=tuple(opts.get("transports", ("shm", "tcp"))),
                        data_port=opts.get("data_port", 0),
                        busy=(lambda: True) if opts.get("busy") else None,
                        pull_programs=opts.get("pull_programs", 0))
    else:
        from pdserve.kv_transfer.sender import KVSender

        ep = KVSender(pool, c, name=opts.get("name", "P0"), internal_token=opts.get("token", "tok"),
                      transfer_timeout=opts.get("transfer_timeout", 30.0),
                      tcp_connections=opts.get("tcp_connections"))
        if opts.get("stall_push") == "mid_block":
            _stall_mid_block()
        elif opts.get("stall_push"):
            ep._push = lambda d, offer, xid: None  # P hangs before pushing (tcp)
        if opts.get("corrupt_cuda_ipc") == "handle":
            ep._ipc = {**ep._ipc, "handle": bytes(64)}
        elif opts.get("corrupt_cuda_ipc") == "canary":
            registration = ep._pool_registration

            def corrupted(blocks):
                reg = registration(blocks)
                reg["cuda_ipc"]["canary"]["checksum"] += 1
                return reg

            ep._pool_registration = corrupted

    def pump() -> None:
        for ev in ep.events():
            log.append((ev.rid, ev.kind.value, ev.reason))
            readers_at[ev.rid] = reader_ids()
            if ev.kind is EventKind.ARRIVED:
                arrived[ev.rid] = time.monotonic()
            elif ev.rid in tables:
                if opts.get("poison_on_release") and ev.kind is EventKind.RELEASED:
                    pool.tensor[torch.tensor(tables[ev.rid], device=device)] = float("nan")
                bm.free(tables.pop(ev.rid))

    while True:
        pump()
        if not conn.poll(0.005):
            continue
        cmd, *args = conn.recv()
        if cmd == "stop":
            ep.close()
            pool.close()
            conn.send(None)
            return
        if cmd == "address":
            conn.send(getattr(ep, "address", None))
        elif cmd == "data_port":  # D: the port its tcp data plane listens on
            conn.send(ep.data.port if getattr(ep, "data", None) else None)
        elif cmd == "bounded_copies":  # D: cuda_ipc copies run on `pull_programs` programs
            conn.send(ep.puller.bounded_copies if getattr(ep, "puller", None) else None)
        elif cmd == "reserve":  # D: rid, num_tokens, timeout
            rid, num_tokens, timeout = args
            table = bm.allocate([0] * num_tokens).block_table
            tables[rid] = table
            ep.reserve(rid, table, timeout)
            conn.send(table)
        elif cmd == "fill":  # P: rid, num_tokens, seed -> digest of the data
            rid, num_tokens, seed = args
            table = bm.allocate([0] * num_tokens).block_table
            tables[rid] = table
            data = block_data(seed, len(table))
            pool.tensor[torch.tensor(table, device=device)] = data.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # KV complete before the offer (sender.offer)
            conn.send(digest(data))
        elif cmd == "offer":  # P: rid, address, num_tokens, timeout
            rid, address, num_tokens, timeout = args
            ep.offer(rid, address, tables[rid], num_tokens, timeout)
            conn.send(None)
        elif cmd == "cancel":  # both sides free on the CANCELLED event that follows
            ep.cancel(args[0])
            conn.send(None)
        elif cmd == "read":  # D: rid -> digest of the arrived blocks, then free them
            rid = args[0]
            table = tables.pop(rid)
            conn.send(digest(pool.tensor[torch.tensor(table, device=device)]))
            bm.free(table)
        elif cmd == "drain":  # D: free every arrived reservation (what a scheduler would use)
            n = 0
            for rid in list(arrived):
                if rid in tables:
                    bm.free(tables.pop(rid))
                    n += 1
                del arrived[rid]
            conn.send(n)
        elif cmd == "log":
            conn.send(list(log))
        elif cmd == "arrived":
            conn.send(sorted(arrived))
        elif cmd == "free":
            conn.send((bm.num_free_blocks, bm.num_blocks, len(tables)))
        elif cmd == "stats":
            conn.send(ep.stats())
        elif cmd == "threads":
            conn.send(sorted(t.name for t in threading.enumerate()))
        elif cmd == "readers":
            conn.send(reader_ids())
        elif cmd == "readers_at":
            conn.send(readers_at.get(args[0]))


def _stall_mid_block() -> None:
    """P's tcp senders, for requests whose id starts with "stall": the first batch's header
    and half its first block, then nothing until the connection is shut down."""

    from pdserve.kv_transfer import tcp_send

    send_cpu = tcp_send._Sender._send_cpu

    def stalled(self, part):
        if not part.offer.rid.startswith("stall"):
            return send_cpu(self, part)
        bb = self.link.block_bytes
        b = part.blocks[0]
        self.sock.sendall(self._header(part, 0, len(part.blocks)))
        self.sock.sendall(self.link.pool_bytes[b * bb:b * bb + bb // 2])
        try:
            self.sock.recv(1)  # returns once D (or P itself) shuts the connection down
        except OSError:
            pass
        raise ConnectionError("stalled sender woken by a shutdown")

    tcp_send._Sender._send_cpu = stalled


@dataclass
class Proc:
    role: str
    proc: mp.Process
    conn: object

    def call(self, *cmd, timeout: float = 30.0):
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role} did not answer {cmd[0]!r} in {timeout} s")
        return self.conn.recv()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop", timeout=10)
            except (TimeoutError, OSError, EOFError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()


# What a CPU-pool process imports before it takes commands: preloaded once, in the forkserver.
_PRELOAD = ["torch", "zmq", "pdserve.engine.block_manager", "pdserve.engine.kv_pool",
            "pdserve.kv_transfer.receiver", "pdserve.kv_transfer.sender",
            "pdserve.kv_transfer.protocol", "pdserve.kv_transfer.states",
            "pdserve.kv_transfer.staging", "pdserve.kv_transfer.tcp_send",
            "tests.kv_transfer.harness"]


def _context(opts: dict):
    """CPU pools: a forkserver (a fresh interpreter, started once, that imported torch and
    the transfer modules and holds no thread, socket or CUDA context) forks each process,
    which starts in ~0.3 s instead of a spawned interpreter's ~1.4 s; what a process patches
    (tcp_send.BATCH_BYTES, the stalled sender) stays in that process, as under spawn. GPU
    pools keep spawn: CUDA starts in an interpreter of its own, as the workers' does."""
    if str(opts.get("device", "cpu")).startswith("cuda"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the forkserver starts (the first call)
    return ctx


def start(role: str, **opts) -> Proc:
    ctx = _context(opts)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_main, args=(role, child, opts), daemon=True)
    proc.start()
    p = Proc(role, proc, parent)
    p.call("free", timeout=60)  # ready
    return p


def wait_for(fn, timeout: float = 20.0, interval: float = 0.05):
    """Poll fn() until it returns a truthy value; returns it, or raises TimeoutError."""
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"condition not met in {timeout} s (last: {value!r})")
        time.sleep(interval)


def all_free(p: Proc) -> bool:
    """Every block of the process's pool is free and it holds no request."""
    free, total, held = p.call("free")
    return free == total and held == 0


def move(d: Proc, p: Proc, addr: str, lengths: dict[str, int], seed: int = 0) -> None:
    """Reserve on D, fill and offer on P, wait for every arrival, compare digests."""
    want = {}
    for i, (rid, n) in enumerate(lengths.items()):
        d.call("reserve", rid, n, 30.0)
        want[rid] = p.call("fill", rid, n, seed + i)
    for rid, n in lengths.items():
        p.call("offer", rid, addr, n, 30.0)
    wait_for(lambda: set(want) <= set(d.call("arrived")), timeout=30)
    for rid, digest in want.items():
        assert d.call("read", rid) == digest, rid
