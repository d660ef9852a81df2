"""Test helpers for the kernels: paged batches with shuffled block tables, poisoned outputs,
relative errors. Every case draws fresh random inputs from its own seed."""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def seed_for(name: str) -> int:
    """A different, reproducible seed for every test case (by its node name)."""
    return zlib.crc32(name.encode())


@contextmanager
def poisoned_outputs():
    """Within the block, float tensors the launchers allocate start as NaN, so an element a
    kernel never writes shows up as NaN in the result."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes)."""
    out, ref = out.double(), ref.double()
    if out.isnan().any() or out.isinf().any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@dataclass
class PagedBatch:
    """Queries packed back to back and a KV pool whose blocks are handed out shuffled."""

    q: torch.Tensor  # [T, Hq, D] (prefill) or [B, Hq, D] (decode)
    kv_cache: torch.Tensor  # [NB, L, 2, bs, Hkv, D]
    layer: int
    block_tables: torch.Tensor  # [B, max blocks], padded with random valid ids
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B]
    max_query_len: int
    max_seq_len: int


def make_paged_batch(
    q_lens: list[int], ctx_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str, gen: torch.Generator,
    num_layers: int = 2, spare_blocks: int = 3, index_dtype: torch.dtype = torch.int64,
) -> PagedBatch:
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim,
                        generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(max(blocks_per_seq), 1)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[used:used + n]
        used += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(dtype)

    def idx(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=index_dtype, device=device)

    return PagedBatch(
        q=q.to(device), kv_cache=cache.to(device), layer=num_layers - 1,
        block_tables=tables.to(index_dtype).to(device), query_start_loc=idx(starts),
        seq_lens=idx(seq_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )
