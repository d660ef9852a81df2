"""D's tcp data plane: P's data connections, received straight into the reserved blocks.

D listens on one data port (the KV port's interface; `--kv-data-port`, by default a free
port; Welcome tells P which). P opens a few connections per session (`tcp_send.py`,
`--kv-tcp-connections`), each proving itself with the session's data key in its first
bytes; a reader thread per connection then takes batches (a DATA_BATCH header, then whole
blocks) and `recv_into`s each block's bytes:
- CPU pool: straight into the block's memory (a memoryview of the pool), so the kernel's
  copy out of the socket is the only one, as for a raw socket;
- GPU pool: chunk by chunk into the connection's ring of pinned buffers (`staging.py`),
  each chunk then copied to its blocks' bytes on the connection's stream while the next
  ones are received (pinned memory: STAGING_DEPTH x STAGING_BYTES per connection).

A transfer, called from the receiver's I/O thread except where said:
`open_transfer` (before Send goes to P) makes an Inbound; readers claim its batches under
the lock (each block index once: a repeated or out-of-range one fails the transfer and
closes the connection); the reader that lands its last block (its GPU copies, and the other
readers', completed) calls `on_complete`. `close_transfer` (the reservation ends, whatever
the outcome) returns only once no reader writes into its blocks: it closes the Inbound
(later batches for it go to a scratch buffer), waits for readers inside one of its
batches, and past STALL_GRACE_S shuts their connections down and joins their threads (P
stalled or frozen mid-batch). Only then may the blocks be freed. A connection that ends
(P died, D shut it, bad framing) calls `on_lost`: the receiver fails the session's
transfers in flight (D then recomputes them).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.common.logs import Throttled
from pdserve.engine.kv_pool import KVPool
from pdserve.kv_transfer.channel import configure_data_socket
from pdserve.kv_transfer.protocol import (
    DATA_BATCH,
    DATA_HELLO,
    DATA_MAGIC,
    DATA_VERSION,
    MAX_DATA_CONNECTIONS,
)
from pdserve.kv_transfer.staging import StagingRing, byte_runs, chunks, pool_address

logger = logging.getLogger(__name__)
flood = Throttled(logger)

STALL_GRACE_S = 0.2  # a reader inside an ended transfer's batch this long is shut down
HELLO_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 256  # handshaking or serving; more are closed at once
SCRATCH_BYTES = 1 << 20  # where batches of an ended transfer are drained


class DataError(ConnectionError):
    """The peer broke the framing or the rules: its connection is closed."""


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock` (ConnectionError if the peer closes first)."""
    while len(view):
        n = sock.recv_into(view, len(view), socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError("connection closed by P")
        view = view[n:]


@dataclass(eq=False)
class _Conn:
    """One data connection and its reader thread."""

    sock: socket.socket
    peer: str
    thread: threading.Thread | None = None
    key: str = ""  # its session's data key, once its hello is read
    why_stopped: str = ""  # set when D shuts it down itself
    staging: StagingRing | None = None  # GPU pools: made on first use


@dataclass(eq=False)
class _Inbound:
    """One reservation's destination blocks, open to its session's connections."""

    xid: int
    rid: str
    key: str
    dst: list[int]
    claimed: bytearray  # per block index of the offer: claimed by a batch
    num_landed: int = 0
    closed: bool = False
    busy: set[_Conn] = field(default_factory=set)  # readers inside one of its batches
    events: list[Any] = field(default_factory=list)  # GPU: its host-to-device copies


class DataPlane:
    """D's data port and the readers of P's connections. Callbacks (`on_complete(xid, rid)`,
    `on_failed(xid, rid, reason)`, `on_lost(key, reason)`) run on reader threads: they must
    only hand the news to the I/O thread."""

    def __init__(self, pool: KVPool, host: str, on_complete: Callable[[int, str], None],
                 on_failed: Callable[[int, str, str], None],
                 on_lost: Callable[[str, str], None], port: int = 0):
        self.pool = pool
        self.block_bytes = pool.spec.bytes_per_block
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=64)
        self.listener.setblocking(False)
        self.fileno = self.listener.fileno()
        self.port = self.listener.getsockname()[1]
        self._on_complete, self._on_failed, self._on_lost = on_complete, on_failed, on_lost
        self._cond = threading.Condition()
        self._sessions: dict[str, set[_Conn]] = {}  # data key -> its live connections
        self._conns: set[_Conn] = set()  # every connection with a reader thread
        self._inbound: dict[int, _Inbound] = {}
        self._xids = itertools.count(1)
        self._serial = itertools.count(1)  # names reader threads, for logs and tests
        self._gpu = pool.device.type == "cuda"
        # CPU pool: one byte view of the whole pool; a block is a slice of it (no copy)
        self._pool_bytes = None if self._gpu else \
            memoryview(pool.tensor.view(-1).view(torch.uint8).numpy())

    # ---- the receiver's I/O thread ---------------------------------------------------------

    def add_session(self, key: str) -> None:
        with self._cond:
            self._sessions[key] = set()

    def drop_session(self, key: str) -> None:
        """The session ended (its transfers were closed first): stop its connections."""
        with self._cond:
            conns = self._sessions.pop(key, set())
        self._stop(conns, "the session ended")

    def open_transfer(self, key: str, rid: str, dst: list[int]) -> int:
        """Open `dst` (the reserved blocks, in the offer's order) to the session's batches;
        returns the transfer id for Send."""
        xid = next(self._xids)
        with self._cond:
            self._inbound[xid] = _Inbound(xid, rid, key, list(dst), bytearray(len(dst)))
        return xid

    def close_transfer(self, xid: int) -> None:
        """The transfer ended: returns once no reader writes into its blocks any more."""
        with self._cond:
            t = self._inbound.pop(xid, None)
            if t is None:
                return
            t.closed = True
            self._cond.wait_for(lambda: not t.busy, STALL_GRACE_S)
            stuck = list(t.busy)
        if stuck:
            logger.warning("transfer %s ended while P's data was mid-batch on %d connection(s) "
                           "for %.1f s: closing them", t.rid, len(stuck), STALL_GRACE_S)
            self._stop(stuck, f"stalled inside transfer {t.rid} after it ended")
            with self._cond:  # a reader leaves `busy` before its thread ends
                if t.busy:
                    logger.error("a reader of %s did not stop; its blocks may still change",
                                 t.rid)
        for ev in t.events:  # copies into its blocks already launched
            ev.synchronize()

    def transfers_of(self, key: str) -> list[tuple[int, str]]:
        """(transfer id, rid) of the session's open transfers."""
        with self._cond:
            return [(t.xid, t.rid) for t in self._inbound.values() if t.key == key]

    def num_connections(self) -> int:
        with self._cond:
            return sum(len(c) for c in self._sessions.values())

    def accept(self) -> None:
        """The listener is readable: take the connections waiting, a reader thread each."""
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: the next poll tries again
                flood.warning("accept", "accepting a data connection failed: %s", e)
                return
            with self._cond:
                full = len(self._conns) >= MAX_CONNECTIONS
            if full:
                flood.warning("full", "refused a data connection from %s: %d open", addr[0],
                              MAX_CONNECTIONS)
                sock.close()
                continue
            sock.setblocking(True)
            configure_data_socket(sock)
            c = _Conn(sock, f"{addr[0]}:{addr[1]}")
            c.thread = threading.Thread(target=self._read, args=(c,), daemon=True,
                                        name=f"kv-tcp-reader-{next(self._serial)}")
            with self._cond:
                self._conns.add(c)
            c.thread.start()

    def close(self) -> None:
        """D closes: stop the listener and every connection left."""
        self.listener.close()
        with self._cond:
            conns = set(self._conns)
            self._sessions.clear()
        self._stop(conns, "D closing")

    def _stop(self, conns: set[_Conn] | list[_Conn], why: str) -> None:
        for c in conns:
            c.why_stopped = why
            try:
                c.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv
            except OSError:
                pass  # already closed
        for c in conns:
            if c.thread is not None and c.thread is not threading.current_thread():
                c.thread.join(JOIN_TIMEOUT_S)

    # ---- reader threads --------------------------------------------------------------------

    def _read(self, c: _Conn) -> None:
        reason = ""
        try:
            c.sock.settimeout(HELLO_TIMEOUT_S)
            hello = bytearray(DATA_HELLO.size)
            recv_exact(c.sock, memoryview(hello))
            magic, version, key, _ = DATA_HELLO.unpack(hello)
            if magic != DATA_MAGIC or version != DATA_VERSION:
                raise DataError(f"not a pdserve data connection (v{DATA_VERSION})")
            with self._cond:
                conns = self._sessions.get(key.decode("ascii", "replace"))
                if conns is None:
                    raise DataError("unknown data key")
                if len(conns) >= MAX_DATA_CONNECTIONS:
                    raise DataError(f"over {MAX_DATA_CONNECTIONS} connections in one session")
                if c.why_stopped:
                    raise DataError(c.why_stopped)
                conns.add(c)
                c.key = key.decode("ascii")
            c.sock.settimeout(None)
            self._serve(c)
        except (OSError, RuntimeError) as e:  # DataError is a ConnectionError
            reason = c.why_stopped or str(e) or type(e).__name__
        except Exception as e:  # a bug: still end the connection and report it
            logger.exception("data connection from %s: error in its reader", c.peer)
            reason = f"{type(e).__name__}: {e}"
        finally:
            with self._cond:
                self._conns.discard(c)
                self._sessions.get(c.key, set()).discard(c)
            c.sock.close()
            if c.staging is not None:  # its pinned buffers outlive no copy of ours
                try:
                    c.staging.wait()
                except RuntimeError:
                    logger.exception("data connection from %s: waiting for its copies", c.peer)
            if c.key:
                logger.info("data connection from %s closed: %s", c.peer, reason)
                self._on_lost(c.key, reason)
            else:
                flood.warning("hello", "data connection from %s refused: %s", c.peer, reason)

    def _serve(self, c: _Conn) -> None:
        header = bytearray(DATA_BATCH.size)
        while True:
            recv_exact(c.sock, memoryview(header))
            magic, first, count, xid = DATA_BATCH.unpack(header)
            if magic != DATA_MAGIC:
                raise DataError("bad batch header")
            t = self._claim(c, xid, first, count)
            if t is None:  # an ended transfer's batch: drain it
                self._discard(c, count * self.block_bytes)
                continue
            landed = False
            try:
                landed = (self._land_gpu if self._gpu else self._land_cpu)(c, t, first, count)
            finally:
                with self._cond:
                    t.busy.discard(c)
                    t.num_landed += count if landed else 0
                    complete = t.num_landed == len(t.dst) and not t.closed
                    self._cond.notify_all()
                    events = list(t.events)
            if complete:
                for ev in events:  # every reader's copies into its blocks
                    ev.synchronize()
                self._on_complete(t.xid, t.rid)

    def _claim(self, c: _Conn, xid: int, first: int, count: int) -> _Inbound | None:
        """The open transfer a batch fills (now busy with this reader), or None if that
        transfer ended; DataError (failing the transfer) if the batch breaks the rules."""
        with self._cond:
            t = self._inbound.get(xid)
            if t is None or t.closed:
                return None
            if t.key != c.key:
                raise DataError(f"batch for transfer {xid} of another session")
            why = ""
            if count == 0 or first + count > len(t.dst):
                why = f"batch of blocks [{first}, {first + count}) outside the offer's " \
                      f"{len(t.dst)} blocks"
            elif any(t.claimed[first:first + count]):
                why = f"a block of [{first}, {first + count}) sent twice"
            else:
                t.claimed[first:first + count] = b"\x01" * count
                t.busy.add(c)
                return t
        self._on_failed(xid, t.rid, f"bad tcp data from P: {why}")
        raise DataError(why)

    def _release_early(self, c: _Conn, t: _Inbound) -> None:
        """Leave an ended transfer mid-batch: close_transfer may return at once."""
        with self._cond:
            t.busy.discard(c)
            self._cond.notify_all()

    def _land_cpu(self, c: _Conn, t: _Inbound, first: int, count: int) -> bool:
        """Receive `count` blocks into t's blocks from index `first`, one recv per run of
        blocks consecutive in D's pool. False if t ended meanwhile (the rest drained)."""
        bb, pool, dst = self.block_bytes, self._pool_bytes, t.dst
        j, end = first, first + count
        while j < end:
            if t.closed:
                self._release_early(c, t)
                self._discard(c, (end - j) * bb)
                return False
            k = j + 1
            while k < end and dst[k] == dst[k - 1] + 1:
                k += 1
            recv_exact(c.sock, pool[dst[j] * bb:(dst[k - 1] + 1) * bb])
            j = k
        return True

    def _land_gpu(self, c: _Conn, t: _Inbound, first: int, count: int) -> bool:
        """Receive the batch chunk by chunk into the connection's pinned ring, each chunk
        then copied to t's blocks on the ring's stream while the next ones arrive."""
        bb = self.block_bytes
        if c.staging is None:
            c.staging = StagingRing(self.pool.device)
        ring = c.staging
        base = pool_address(self.pool.tensor)
        left = count * bb
        for pieces in chunks(byte_runs(t.dst[first:first + count], bb), ring.nbytes):
            if t.closed:
                self._release_early(c, t)
                self._discard(c, left)
                return False
            n = sum(m for _, m in pieces)
            k = ring.take()  # its last chunk's copy has read the buffer
            recv_exact(c.sock, ring.views[k][:n])
            ev = ring.copy(k, pieces, base, to_device=True)
            with self._cond:  # (an event recorded again later waits for more, never less)
                if ev not in t.events:
                    t.events.append(ev)
            left -= n
        return True

    def _discard(self, c: _Conn, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, SCRATCH_BYTES)))
        while nbytes:
            n = min(nbytes, len(scratch))
            recv_exact(c.sock, scratch[:n])
            nbytes -= n
