"""Pinned staging for the tcp data plane between GPU pools: a ring of pinned host buffers
and one copy stream per data connection (`tcp_send.py` gathers into it, `tcp_recv.py`
scatters out of it).

A batch's bytes (whole blocks, the protocol's unit) are cut into chunks of at most one
buffer: a chunk may end inside a block and the next one go on from there, so the buffer
size is free of the block size. With `depth` buffers, a connection copies up to depth - 1
chunks ahead of the one on the wire (P: device to host while it sends; D: host to device
while it receives the next). Pinned memory per connection and side: depth x nbytes.

Each chunk costs a few driver calls (`cuda_driver.py`; a torch `copy_` per chunk held the
GIL long enough to cap 8 connections near 5-7 GB/s at 1 MiB chunks), and still ~15 us of
the driver's time per call with 8 threads launching: small chunks (1-2 MiB, which would stay
in the host's caches between the DMA and the socket copy) lose to that. The default, two
8 MiB buffers, was the best of 1-16 MiB x 2-4 buffers on an H200 host (BENCHMARKS.md,
issue 24, session 13: 95% / 109% of the raw socket rate at 4k / 16k tokens).
"""

from __future__ import annotations

import torch

from pdserve.kv_transfer import cuda_driver

STAGING_BYTES = 8 << 20  # each pinned buffer
STAGING_DEPTH = 2  # buffers per connection


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
    """`depth` pinned buffers of `nbytes`, an event per buffer marking its last copies done,
    and a copy stream on `device`, for the one thread that calls it (its connection's).
    `take()` gives the next buffer once its last copies are done."""

    def __init__(self, device: torch.device, nbytes: int = 0, depth: int = 0):
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)  # pinned memory in this device's context
        cuda_driver.make_current(index)  # and the driver calls of this thread
        self.nbytes = nbytes or STAGING_BYTES
        depth = max(2, depth or STAGING_DEPTH)
        self.stream = torch.cuda.Stream(device=device)
        self._handle = self.stream.cuda_stream
        self.bufs = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
                     for _ in range(depth)]
        self._ptrs = [b.data_ptr() for b in self.bufs]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        self.events = [cuda_driver.Event(index) for _ in range(depth)]
        self._next = 0

    @property
    def depth(self) -> int:
        return len(self.bufs)

    def take(self) -> int:
        """The next buffer's index, once its last copies have finished."""
        k = self._next
        self._next = (k + 1) % len(self.bufs)
        self.events[k].synchronize()
        return k

    def copy(self, k: int, pieces: list[tuple[int, int]], base: int, to_device: bool
             ) -> cuda_driver.Event:
        """Launch the copies between buffer k (its first bytes, in order) and `pieces` of
        the GPU memory at address `base` (the pool's) on the stream: into the pool if
        `to_device`, else out of it. Returns buffer k's event, recorded after them (it
        is recorded again when the buffer is next used)."""
        host = self._ptrs[k]
        for p, n in pieces:
            if to_device:
                cuda_driver.copy_to_device(base + p, host, n, self._handle)
            else:
                cuda_driver.copy_to_host(host, base + p, n, self._handle)
            host += n
        self.events[k].record(self._handle)
        return self.events[k]

    def wait(self) -> None:
        """Every copy launched so far has finished."""
        for ev in self.events:
            ev.synchronize()


def pool_address(pool_tensor: torch.Tensor) -> int:
    """The GPU address of the pool's first byte (offsets of `byte_runs` are from it)."""
    if not pool_tensor.is_contiguous():
        raise ValueError("the KV pool must be one contiguous allocation")
    return pool_tensor.data_ptr()
