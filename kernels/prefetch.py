"""Warming the L2 cache with a weight while the GPU waits on a latency-bound kernel.

At decode's few rows a layer's attention reads little (batch 1 at a 1k context: 4 MiB of K/V a
layer) and is bound by its chain of dependent loads, ~9 us in which HBM sits mostly idle, while
the o_proj after it streams 32 MiB of weights no earlier kernel touched. `l2_prefetch` reads a
tensor's bytes into L2 from a few programs; run on a side stream beside the attention, it
turns o_proj's HBM read into an L2 read (engine/model.py decides when). A hint only: it writes
nothing the model reads, so no result bit depends on it.

Two ways to pull the bytes in:
- "bulk" (Hopper, sm_90): `cp.async.bulk.prefetch.L2` per chunk, no registers, no stores;
  one instruction asks for up to `chunk` bytes.
- "load": plain loads kept in L2 (evict_last), xor-folded into one int32 a program so the
  loads stay; runs anywhere, the interpreter included.
"""

from __future__ import annotations

import torch

from pdserve.kernels.triton_utils import check_device, tl, triton

VARIANTS = ("bulk", "load")


@triton.jit
def bulk_prefetch_l2(ptrs, sizes):
    """Ask L2 for sizes[i] bytes from ptrs[i] (Hopper's cp.async.bulk.prefetch.L2; sizes
    multiples of 16, the addresses 16-byte aligned); a size of 0 asks for nothing. Compiled
    code only (inline PTX): not under the interpreter."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, sizes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_bulk_kernel(ptr, n_bytes, CHUNK: tl.constexpr, PER_PROG: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * (PER_PROG * CHUNK) + tl.arange(0, PER_PROG).to(tl.int64) * CHUNK
    size = tl.maximum(tl.minimum(n_bytes - offs, CHUNK), 0).to(tl.int32)
    bulk_prefetch_l2(ptr + offs, size)  # a chunk past the end has size 0: skipped


@triton.jit
def _prefetch_load_kernel(ptr, n, out, iters, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    base = pid.to(tl.int64) * iters * BLOCK
    for i in range(iters):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(out + pid, tl.xor_sum(acc, 0))


def l2_prefetch(t: torch.Tensor, *, variant: str = "bulk", programs: int = 8,
                chunk: int = 1 << 16, scratch: torch.Tensor | None = None) -> None:
    """Pull contiguous `t`'s bytes into L2 from `programs` programs (a few: it should leave
    the SMs to the kernel beside it). "bulk" asks for `chunk` bytes an instruction (a
    multiple of 16; `t` 16-byte aligned); "load" xor-folds into `scratch` (int32, at least
    `programs` elements: allocated when None, which a CUDA graph capture must avoid)."""
    if variant not in VARIANTS:
        raise ValueError(f"l2_prefetch variant {variant!r}: expected one of {VARIANTS}")
    if not t.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    if programs < 1:
        raise ValueError(f"l2_prefetch programs {programs}: expected at least 1")
    check_device(t)
    n_bytes = t.numel() * t.element_size()
    if n_bytes == 0:
        return
    if variant == "bulk":
        if chunk % 16 or chunk <= 0 or t.data_ptr() % 16:
            raise ValueError(f"l2_prefetch bulk: chunk {chunk} must be a positive multiple of "
                             "16 and the tensor 16-byte aligned")
        chunks = -(-n_bytes // chunk)
        per_prog = triton.next_power_of_2(-(-chunks // programs))
        grid = (-(-chunks // per_prog),)
        _prefetch_bulk_kernel[grid](t.view(-1).view(torch.uint8), n_bytes, CHUNK=chunk,
                                    PER_PROG=per_prog, num_warps=1)
        return
    if n_bytes % 4:
        raise ValueError("l2_prefetch load: the tensor's size must be a multiple of 4 bytes")
    words = t.view(-1).view(torch.int32)
    if scratch is None:
        scratch = torch.empty(programs, dtype=torch.int32, device=t.device)
    elif scratch.numel() < programs or scratch.dtype != torch.int32:
        raise ValueError(f"l2_prefetch load: scratch must be int32 with >= {programs} elements")
    block = 2048
    iters = -(-words.numel() // (programs * block))
    _prefetch_load_kernel[(programs,)](words, words.numel(), scratch, iters, BLOCK=block,
                                       num_warps=8)
