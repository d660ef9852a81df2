"""Pinned staging for the tcp data plane between GPU pools: a ring of pinned host buffers
and one copy stream per data connection (`tcp_send.py` gathers into it, `tcp_recv.py`
scatters out of it).

A batch's bytes (whole blocks, the protocol's unit) are cut into chunks of at most one
buffer: a chunk may end inside a block and the next one go on from there, so the buffer
size is free of the block size. With `depth` buffers, a connection copies up to depth - 1
chunks ahead of the one on the wire (P: device to host while it sends; D: host to device
while it receives the next). Pinned memory per connection and side: depth x nbytes.

Small buffers stay in the host's caches between the DMA and the socket copy (each byte is
touched by both); large ones cost fewer Python calls per byte. The defaults are the best of
a sweep on the H100 host (BENCHMARKS.md, issue 24, session 13).
"""

from __future__ import annotations

from typing import Any

import torch

STAGING_BYTES = 4 << 20  # each pinned buffer
STAGING_DEPTH = 3  # buffers per connection


def byte_runs(ids: list[int], block_bytes: int) -> list[tuple[int, int]]:
    """(byte offset in the pool, length) of each run of consecutive block ids, in order."""
    out: list[tuple[int, int]] = []
    for b in ids:
        if out and out[-1][0] + out[-1][1] == b * block_bytes:
            out[-1] = (out[-1][0], out[-1][1] + block_bytes)
        else:
            out.append((b * block_bytes, block_bytes))
    return out


def chunks(pieces: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """`pieces` (offset, length) cut into consecutive chunks of at most `size` bytes each
    (every chunk full but the last), a piece split where a chunk ends."""
    out: list[list[tuple[int, int]]] = []
    room = 0
    for off, n in pieces:
        while n:
            if not room:
                out.append([])
                room = size
            take = min(n, room)
            out[-1].append((off, take))
            off, n, room = off + take, n - take, room - take
    return out


class StagingRing:
    """`depth` pinned buffers of `nbytes`, the events of their last copies, and a copy
    stream on `device`. `take()` gives the next buffer once its last copy is done."""

    def __init__(self, device: torch.device, nbytes: int = 0, depth: int = 0):
        torch.cuda.set_device(device)  # pinned memory and events in this device's context
        self.nbytes = nbytes or STAGING_BYTES
        depth = max(2, depth or STAGING_DEPTH)
        self.stream = torch.cuda.Stream(device=device)
        self.bufs = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
                     for _ in range(depth)]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        self.events: list[Any] = [None] * depth
        self._next = 0

    @property
    def depth(self) -> int:
        return len(self.bufs)

    def take(self) -> int:
        """The next buffer's index, once its last copy has finished."""
        k = self._next
        self._next = (k + 1) % len(self.bufs)
        if self.events[k] is not None:
            self.events[k].synchronize()
        return k

    def copy(self, k: int, pieces: list[tuple[int, int]], flat: torch.Tensor,
             to_device: bool) -> Any:
        """Launch the copies between buffer k (its first bytes, in order) and `pieces` of
        `flat` (the pool's bytes) on the stream: into the pool if `to_device`, else out of
        it. Returns the event that marks them done (also kept as the buffer's)."""
        buf = self.bufs[k]
        with torch.cuda.stream(self.stream):
            off = 0
            for p, n in pieces:
                if to_device:
                    flat[p:p + n].copy_(buf[off:off + n], non_blocking=True)
                else:
                    buf[off:off + n].copy_(flat[p:p + n], non_blocking=True)
                off += n
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[k] = ev
        return ev

    def wait(self) -> None:
        """Every copy launched so far has finished."""
        for ev in self.events:
            if ev is not None:
                ev.synchronize()


def pool_bytes(pool_tensor: torch.Tensor) -> torch.Tensor:
    """The pool as one flat byte tensor (offsets of `byte_runs` index it)."""
    return pool_tensor.view(-1).view(torch.uint8)
