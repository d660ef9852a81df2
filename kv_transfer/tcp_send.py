"""P's tcp data plane: a few connections per D session that push offered blocks' bytes.

A `DataLink` is made when D's Welcome names a data port: `num_connections` sender threads,
each connecting to D's data port at the host of the session's address (what D advertised:
`--advertise-host`), sending DATA_HELLO with the session's data key, then serving its queue
of parts. At D's Send(x) the offer's blocks are split into one contiguous part per
connection; a part goes out as batches (a DATA_BATCH header, then up to BATCH_BYTES of
whole blocks):
- CPU pool: one `sendmsg` per batch of memoryviews of the pool's blocks (no copy in user
  space: the kernel's copy into the socket is the only one);
- GPU pool: the batch's bytes are gathered chunk by chunk into the connection's ring of
  pinned buffers on its copy stream (`staging.py`), up to depth - 1 chunks ahead of the one
  on the wire; the pinned budget is STAGING_DEPTH x STAGING_BYTES per connection.

Why several connections: one TCP stream is bound by one core's copy (4.6 GB/s on the
16-core GPU host, where 8 connections moved 21-23 GB/s; BENCHMARKS.md, issue 24).

Lifetime: a part whose offer left SENDING (released: cancel, deadline, Done) stops at its
next batch boundary; the offer's blocks are P's again only once each of its parts ended
(`on_part_ended`, from the sender thread). A send blocked past the sender's grace (D
frozen with full buffers) is unblocked by `kill` (shuts the sockets down). A connection
that fails calls `on_lost` once per link: the sender then ends the session.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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
from pdserve.kv_transfer.states import OfferState, PendingOffer

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
BATCH_BYTES = 8 << 20  # bytes per batch (a cancelled part stops between them); CPU: a sendmsg
MAX_IOV = 512  # buffers per sendmsg (Linux allows 1024)


def default_connections() -> int:
    """Data connections per D session when not configured: up to 8, at most one per core
    (each moves about one core's memcpy worth; on 2 cores 2 and 4 measured alike; on a
    16-core H100 host loopback moved 14.4 GB/s over 4 connections and 22.3 over 8)."""
    return max(1, min(8, os.cpu_count() or 1))


def sendmsg_all(sock: socket.socket, bufs: list[Any]) -> None:
    """sendmsg until every buffer is sent (a blocking send may still stop part way)."""
    i = 0
    while i < len(bufs):
        n = sock.sendmsg(bufs[i:i + MAX_IOV])
        while i < len(bufs) and n >= len(bufs[i]):
            n -= len(bufs[i])
            i += 1
        if n:
            bufs[i] = memoryview(bufs[i])[n:]


@dataclass(eq=False)
class _Part:
    offer: PendingOffer
    xid: int
    first: int  # index in the offer of blocks[0]
    blocks: list[int]


class _Sender:
    """One connection and its thread."""

    def __init__(self, link: DataLink, index: int):
        self.link, self.index = link, index
        self.queue: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._staging: StagingRing | None = None  # GPU pools: made on first use
        self.thread = threading.Thread(target=self._run, name=f"kv-tcp-sender-{index}",
                                       daemon=True)

    def shutdown(self) -> None:
        """Unblock a send in progress and fail every later one (any thread)."""
        with self._lock:
            self._closed = True
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _connect(self) -> None:
        link = self.link
        sock = socket.create_connection((link.host, link.port), timeout=CONNECT_TIMEOUT_S)
        configure_data_socket(sock)
        sock.settimeout(None)
        with self._lock:
            if self._closed:
                sock.close()
                raise ConnectionError("closed before connecting")
            self.sock = sock
        sock.sendall(DATA_HELLO.pack(DATA_MAGIC, DATA_VERSION, link.key.encode(), self.index))

    def _run(self) -> None:
        error = ""
        if self.link.gpu:
            torch.cuda.set_device(self.link.pool.device)
        try:
            self._connect()
        except OSError as e:
            error = f"connecting to D's data port {self.link.host}:{self.link.port}: {e}"
            self.link.lost(error)
        while True:
            part = self.queue.get()
            if part is None:
                break
            try:
                if not error and part.offer.state is OfferState.SENDING:
                    (self._send_gpu if self.link.gpu else self._send_cpu)(part)
            except OSError as e:
                error = f"sending to D's data port: {e}"
                self.link.lost(error)
            except Exception as e:  # a bug: the part still ends, the session is renewed
                logger.exception("tcp sender %d: error sending a part", self.index)
                error = f"{type(e).__name__}: {e}"
                self.link.lost(error)
            finally:
                self.link.on_part_ended(part.offer)
        with self._lock:
            self._closed = True
            if self.sock is not None:
                self.sock.close()

    def _header(self, part: _Part, start: int, count: int) -> bytes:
        return DATA_BATCH.pack(DATA_MAGIC, part.first + start, count, part.xid)

    def _send_cpu(self, part: _Part) -> None:
        bb, pool, sock = self.link.block_bytes, self.link.pool_bytes, self.sock
        per = max(1, min(MAX_IOV - 1, BATCH_BYTES // bb))
        for start in range(0, len(part.blocks), per):
            if part.offer.state is not OfferState.SENDING:
                return  # released (cancelled, timed out): D drains what it has
            ids = part.blocks[start:start + per]
            bufs: list[Any] = [self._header(part, start, len(ids))]
            bufs += [pool[o:o + n] for o, n in byte_runs(ids, bb)]  # views: no copy
            sendmsg_all(sock, bufs)

    def _send_gpu(self, part: _Part) -> None:
        """Send the part's batches chunk by chunk out of the pinned ring, gathering the
        next depth - 1 chunks on the copy stream meanwhile. A released offer stops at a
        batch boundary (D is never left inside a batch)."""
        link, bb = self.link, self.link.block_bytes
        if self._staging is None:
            self._staging = StagingRing(link.pool.device)
        ring = self._staging
        base = pool_address(link.pool.tensor)
        per = max(1, BATCH_BYTES // bb)
        work: list[tuple[bytes | None, list[tuple[int, int]]]] = []  # (batch header, pieces)
        for start in range(0, len(part.blocks), per):
            ids = part.blocks[start:start + per]
            for j, pieces in enumerate(chunks(byte_runs(ids, bb), ring.nbytes)):
                work.append((self._header(part, start, len(ids)) if j == 0 else None, pieces))
        ahead = ring.depth - 1
        taken: list[int] = []  # ring buffer of each chunk gathered so far

        def gather(i: int) -> None:
            k = ring.take()  # its last chunk was sent already (sendmsg returned)
            ring.copy(k, work[i][1], base, to_device=False)
            taken.append(k)

        try:
            for i in range(min(ahead, len(work))):
                gather(i)
            for i, (header, pieces) in enumerate(work):
                if header is not None and part.offer.state is not OfferState.SENDING:
                    return
                if i + ahead < len(work):
                    gather(i + ahead)
                k = taken[i]
                ring.events[k].synchronize()
                view = ring.views[k][:sum(n for _, n in pieces)]
                sendmsg_all(self.sock, [header, view] if header is not None else [view])
        finally:  # no copy of ours reads the offer's blocks once the part has ended
            ring.wait()


class DataLink:
    """P's data connections of one session with one D. `push` is called from P's I/O
    thread; `on_part_ended(offer)` and `on_lost(reason)` are called from sender threads
    and must only hand the news to the I/O thread."""

    def __init__(self, pool: KVPool, host: str, port: int, key: str, num_connections: int,
                 on_part_ended: Callable[[PendingOffer], None],
                 on_lost: Callable[[DataLink, str], None]):
        self.pool, self.host, self.port, self.key = pool, host, port, key
        self.block_bytes = pool.spec.bytes_per_block
        self.gpu = pool.device.type == "cuda"
        self.pool_bytes = None if self.gpu else \
            memoryview(pool.tensor.view(-1).view(torch.uint8).numpy())
        self.on_part_ended = on_part_ended
        self._on_lost = on_lost
        self._lost = False
        self._next = 0  # the connection the next transfer starts on (spreads small ones)
        self.senders = [_Sender(self, i)
                        for i in range(max(1, min(MAX_DATA_CONNECTIONS, num_connections)))]
        for s in self.senders:
            s.thread.start()

    def push(self, offer: PendingOffer, xid: int) -> int:
        """Queue the offer's blocks as one part per connection; returns the number of
        parts (each ends with one on_part_ended call)."""
        blocks, n = offer.block_ids, len(self.senders)
        per = -(-len(blocks) // n) if blocks else 1
        parts = 0
        for start in range(0, len(blocks), per):
            self.senders[self._next].queue.put(_Part(offer, xid, start,
                                                     blocks[start:start + per]))
            self._next = (self._next + 1) % n
            parts += 1
        return parts

    def lost(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            self._on_lost(self, reason)

    def kill(self) -> None:
        """Shut every connection down: sends blocked on a frozen D fail at once."""
        for s in self.senders:
            s.shutdown()

    def close(self, join_s: float = 1.0) -> None:
        """End the link: each sender ends its queued parts unsent and exits. Joined for at
        most `join_s` (a sender still connecting exits by itself within CONNECT_TIMEOUT_S)."""
        self._lost = True  # no session loss to report any more
        for s in self.senders:
            s.shutdown()
            s.queue.put(None)
        for s in self.senders:
            s.thread.join(join_s)
