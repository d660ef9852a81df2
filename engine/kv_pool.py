"""The paged KV pool: one tensor, block-major, owned here for the life of the engine.

Layout (DESIGN.md §2): [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].
One block holds every layer's K and V of `block_size` tokens in one contiguous span, so the
KV transfer moves a prompt as a few large copies. The block manager hands out block *ids*;
kv_transfer borrows this tensor and never allocates.

Tensor parallelism in a P/D worker (CPU): the pool is one /dev/shm file in this layout with
every KV head (the tp=1 layout, what kv_transfer moves), made by rank 0 and mapped by the
other ranks (`KVPool.attach`); each rank's attention sees only its heads, a strided view
(`KVPool.head_shard`). So a transfer is the same between any two TP sizes, and rank 0's
transports reach every rank's heads without a copy between ranks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pdserve.common.shm_files import SHM_DIR, SHM_PREFIX

logger = logging.getLogger(__name__)

POOL_LAYOUT = "block-major:[block][layer][kv][slot][kv_head][head_dim]/v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVPoolSpec:
    """Shape of one pool; the compatibility record carries it to peers."""

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads,
                self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads,
                               self.head_dim, self.dtype)


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize




def shm_pool_path(epoch: int) -> Path:
    """/dev/shm/pdserve-kv-<pid>-<epoch>.pool: the pid lets a later process tell a stale
    file (its owner is gone) from a live one; the epoch tells incarnations apart."""
    return SHM_DIR / f"{SHM_PREFIX}-{os.getpid()}-{epoch:x}.pool"


class KVPool:
    """Allocates the pool once (zeroed: padded reads in attention must see finite values).

    With `shm_epoch` (CPU only) the tensor lives in a file under /dev/shm, so a decode
    worker on the same host can map it and pull blocks without a copy through a socket.
    The file is unlinked by `close()` (and by the next process's stale-file sweep if this
    one dies).

    `mirror` (tensor parallelism, rank 0): called with each `copy_blocks` list before the
    copy here; it sends the copies to the other ranks, whose pools hold the other KV heads
    of the same blocks (`TPLeader.send_copies`)."""

    def __init__(self, spec: KVPoolSpec, device: torch.device, shm_epoch: int | None = None,
                 mirror: Callable[[list[tuple[int, int]]], None] | None = None):
        self.spec = spec
        self.device = device
        self.mirror = mirror
        self.shm_path: Path | None = None
        if shm_epoch is not None:
            if device.type != "cpu":
                raise ValueError("a shared-memory KV pool must be on the CPU")
            self.shm_path = shm_pool_path(shm_epoch)
            numel = math.prod(spec.shape)
            nbytes = numel * spec.dtype.itemsize
            fd = os.open(self.shm_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, nbytes)  # sparse and zero-filled
            finally:
                os.close(fd)
            flat = torch.from_file(str(self.shm_path), shared=True, size=numel, dtype=spec.dtype)
            self.tensor = flat.view(spec.shape)
        else:
            self.tensor = torch.zeros(spec.shape, dtype=spec.dtype, device=device)
        logger.info(
            "KV pool: %d blocks x %d tokens = %d token slots, %.1f MiB on %s",
            spec.num_blocks, spec.block_size, spec.num_blocks * spec.block_size,
            self.tensor.numel() * self.tensor.element_size() / 2**20, device,
        )

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, K and V) src -> dst: copy-on-write of n > 1 forks."""
        if pairs:
            if self.mirror is not None:
                self.mirror(pairs)
            src = torch.tensor([s for s, _ in pairs], device=self.device)
            dst = torch.tensor([d for _, d in pairs], device=self.device)
            self.tensor[dst] = self.tensor[src]

    @classmethod
    def over(cls, tensor: torch.Tensor, spec: KVPoolSpec,
             mirror: Callable[[list[tuple[int, int]]], None] | None = None) -> KVPool:
        """A pool over memory someone else owns (a mapped file, a head slice of another
        pool); `close()` leaves that memory alone."""
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {tuple(tensor.shape)} {tensor.dtype} is not a pool of "
                             f"shape {spec.shape} {spec.dtype}")
        pool = cls.__new__(cls)
        pool.spec, pool.device, pool.mirror, pool.shm_path = spec, tensor.device, mirror, None
        pool.tensor = tensor
        return pool

    @classmethod
    def attach(cls, path: str | Path, spec: KVPoolSpec) -> KVPool:
        """Map another process's pool file (read-write; tensor-parallel ranks 1..N-1 map
        rank 0's). The owner unlinks it; the mapping stays valid until dropped."""
        numel = math.prod(spec.shape)
        size = os.path.getsize(path)
        if size != numel * spec.dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes, not a pool of shape {spec.shape} {spec.dtype}")
        flat = torch.from_file(str(path), shared=True, size=numel, dtype=spec.dtype)
        return cls.over(flat.view(spec.shape), spec)

    def head_shard(self, start: int, end: int,
                   mirror: Callable[[list[tuple[int, int]]], None] | None = None) -> KVPool:
        """KV heads [start, end) of this pool as a pool of their own: a strided view of the
        same memory, [num_blocks, num_layers, 2, block_size, end - start, head_dim]."""
        if not 0 <= start < end <= self.spec.num_kv_heads:
            raise ValueError(f"KV heads [{start}, {end}) outside [0, {self.spec.num_kv_heads})")
        return KVPool.over(self.tensor[:, :, :, :, start:end],
                           replace(self.spec, num_kv_heads=end - start), mirror)

    @property
    def num_slots(self) -> int:
        return self.spec.num_blocks * self.spec.block_size

    def close(self) -> None:
        """Unlink the shared-memory file (mappings stay valid until dropped)."""
        if self.shm_path is not None:
            self.shm_path.unlink(missing_ok=True)
            self.shm_path = None
