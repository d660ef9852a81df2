"""Whole-block copies between KV pools: the data plane of a KV transfer in one launch.

A block of the block-major pool (all layers, K and V: num_layers * 2 * block_size *
num_kv_heads * head_dim elements) is one contiguous span, so moving a prompt's KV is N large
span copies. `gather_blocks` does all N in ONE launch (N per-block `copy_` calls are launch
bound: DESIGN.md §2 measured 150 GB/s for them against 1,782 GB/s for one gather). The
source may be another tensor than the destination (e.g. a peer's pool opened over CUDA IPC)
as long as both have the same per-block layout.

The spans are reinterpreted as the widest integer words that divide them (8 bytes for any
real pool), so the copy is dtype-agnostic and bit-exact, and each program moves TILE words
per step as 16-byte vector loads and stores over a contiguous range of one block.
"""

from __future__ import annotations

import torch

from pdserve.kernels.triton_utils import check_device, check_index, interpreting, tl, triton


def gather_blocks_ref(
    src_pool: torch.Tensor, src_block_ids: torch.Tensor, dst_pool: torch.Tensor,
    dst_block_ids: torch.Tensor,
) -> None:
    """dst_pool[dst_block_ids[i]] = src_pool[src_block_ids[i]] for every i (whole blocks).

    The pools may be one tensor or two with the same per-block shape and dtype. dst ids must
    be distinct, and in one pool no block may be both a source and a destination of a call.
    """
    dst_pool[dst_block_ids.long()] = src_pool[src_block_ids.long()].to(dst_pool.device)


@triton.jit
def _gather_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_src, stride_dst,  # words between blocks
    words_per_block, tiles_per_program,
    TILE: tl.constexpr, EVEN: tl.constexpr,  # EVEN: TILE divides words_per_block, no masks
):
    i = tl.program_id(0)  # which (src, dst) block pair
    src = src_ptr + tl.load(src_ids_ptr + i).to(tl.int64) * stride_src
    dst = dst_ptr + tl.load(dst_ids_ptr + i).to(tl.int64) * stride_dst
    first = tl.program_id(1) * tiles_per_program
    for t in range(first, first + tiles_per_program):
        offs = t * TILE + tl.arange(0, TILE)
        if EVEN:
            tl.store(dst + offs, tl.load(src + offs))
        else:
            mask = offs < words_per_block
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _gather_blocks_bounded_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_src, stride_dst, words_per_block, tiles_per_block, total_tiles,
    TILE: tl.constexpr, EVEN: tl.constexpr,
):
    # a fixed number of programs (at most that many SMs busy), each striding over every
    # (block pair, tile) of the copy: a pull that leaves the rest of the GPU to decode
    for t in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        i = t // tiles_per_block
        src = src_ptr + tl.load(src_ids_ptr + i).to(tl.int64) * stride_src
        dst = dst_ptr + tl.load(dst_ids_ptr + i).to(tl.int64) * stride_dst
        offs = (t % tiles_per_block) * TILE + tl.arange(0, TILE)
        if EVEN:
            tl.store(dst + offs, tl.load(src + offs))
        else:
            mask = offs < words_per_block
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def _word_view(pool: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """[num_blocks, words] view of a pool whose blocks are contiguous spans."""
    span = pool[0].numel()
    return pool.as_strided((pool.shape[0], span), (pool.stride(0), 1)).view(word)


def _pick_word(src: torch.Tensor, dst: torch.Tensor) -> torch.dtype:
    span = src[0].numel() * src.element_size()
    for word in (torch.int64, torch.int32, torch.int16, torch.uint8):
        size = word.itemsize
        if all(x % size == 0 for x in (span, src.stride(0) * src.element_size(),
                                        dst.stride(0) * dst.element_size(),
                                        src.data_ptr(), dst.data_ptr())):
            return word
    return torch.uint8


def gather_blocks(
    src_pool: torch.Tensor, src_block_ids: torch.Tensor, dst_pool: torch.Tensor,
    dst_block_ids: torch.Tensor, max_programs: int | None = None,
) -> None:
    """Triton `gather_blocks_ref` (same contract), one launch for all blocks. Both pools
    are on the launching device (a peer's memory is mapped into it) and ids on it too.
    `max_programs`: at most that many programs (so SMs) move the blocks, each looping over
    its share of tiles (a bounded pull, issue 24); None: a grid over every block and tile."""
    check_device(src_pool, src_block_ids, dst_pool, dst_block_ids)
    check_index("src_block_ids", src_block_ids, 1)
    check_index("dst_block_ids", dst_block_ids, 1)
    if src_pool.shape[1:] != dst_pool.shape[1:] or src_pool.dtype != dst_pool.dtype:
        raise ValueError(f"pools differ per block: {tuple(src_pool.shape)} {src_pool.dtype} vs "
                         f"{tuple(dst_pool.shape)} {dst_pool.dtype}")
    if src_block_ids.shape != dst_block_ids.shape:
        raise ValueError("src_block_ids and dst_block_ids must have the same length")
    for name, pool in (("src_pool", src_pool), ("dst_pool", dst_pool)):
        if pool.dim() < 2 or not pool[:1].is_contiguous():
            raise ValueError(f"{name}: each block must be one contiguous span")
    num = src_block_ids.shape[0]
    if num == 0:
        return
    word = _pick_word(src_pool, dst_pool)
    src, dst = _word_view(src_pool, word), _word_view(dst_pool, word)
    words = src.shape[1]
    # ~32 KiB per tile step, 4 steps per program: enough bytes in flight per SM, and
    # num * programs_per_block programs to fill the GPU even for a handful of blocks
    tile = min(32768 // src.element_size(), triton.next_power_of_2(words))
    if interpreting():
        tile = min(tile, 1024)
    num_tiles = triton.cdiv(words, tile)
    if max_programs is not None:
        if max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        even = words % tile == 0
        total = num * num_tiles
        _gather_blocks_bounded_kernel[(min(max_programs, total),)](
            src, dst, src_block_ids, dst_block_ids, src.stride(0), dst.stride(0), words,
            num_tiles, total, TILE=tile, EVEN=even, num_warps=8,
        )
        return
    tiles_per_program = min(4, num_tiles)
    grid = (num, triton.cdiv(num_tiles, tiles_per_program))
    even = words % tile == 0 and num_tiles % tiles_per_program == 0
    _gather_blocks_kernel[grid](
        src, dst, src_block_ids, dst_block_ids, src.stride(0), dst.stride(0), words,
        tiles_per_program, TILE=tile, EVEN=even, num_warps=8,
    )
