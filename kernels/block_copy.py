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

A pull's host time is on its critical path (a 4k-token pull moves 512 MiB in ~0.27 ms on an
H200): `BlockGather` checks a pair of pools and builds their word views once, so a puller
that reuses it pays only the launch per pull (issue 24).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels.triton_utils import check_device, check_index, interpreting, sm_count, tl, triton


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
def _copy_tile(src, dst, offs, words_per_block, EVEN: tl.constexpr, STREAM: tl.constexpr):
    # STREAM: the bytes are read once and not read again by this GPU soon: loads evict
    # first and stores stream past L2's normal policy
    if EVEN:
        if STREAM:
            tl.store(dst + offs, tl.load(src + offs, eviction_policy="evict_first"),
                     cache_modifier=".cs")
        else:
            tl.store(dst + offs, tl.load(src + offs))
    else:
        mask = offs < words_per_block
        if STREAM:
            tl.store(dst + offs, tl.load(src + offs, mask=mask, eviction_policy="evict_first"),
                     mask=mask, cache_modifier=".cs")
        else:
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _gather_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_src, stride_dst,  # words between blocks
    words_per_block, tiles_per_program,
    TILE: tl.constexpr, EVEN: tl.constexpr,  # EVEN: TILE divides words_per_block, no masks
    STREAM: tl.constexpr = False,
):
    i = tl.program_id(0)  # which (src, dst) block pair
    src = src_ptr + tl.load(src_ids_ptr + i).to(tl.int64) * stride_src
    dst = dst_ptr + tl.load(dst_ids_ptr + i).to(tl.int64) * stride_dst
    first = tl.program_id(1) * tiles_per_program
    for t in range(first, first + tiles_per_program):
        _copy_tile(src, dst, t * TILE + tl.arange(0, TILE), words_per_block, EVEN, STREAM)


@triton.jit
def _gather_blocks_bounded_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_src, stride_dst, words_per_block, tiles_per_block, total_tiles,
    TILE: tl.constexpr, EVEN: tl.constexpr, STREAM: tl.constexpr = False,
):
    # a fixed number of programs (at most that many SMs busy), each striding over every
    # (block pair, tile) of the copy: a pull that leaves the rest of the GPU to decode
    for t in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        i = t // tiles_per_block
        src = src_ptr + tl.load(src_ids_ptr + i).to(tl.int64) * stride_src
        dst = dst_ptr + tl.load(dst_ids_ptr + i).to(tl.int64) * stride_dst
        offs = (t % tiles_per_block) * TILE + tl.arange(0, TILE)
        _copy_tile(src, dst, offs, words_per_block, EVEN, STREAM)


@dataclass(frozen=True)
class GatherConfig:
    """How an unbounded gather is cut into programs.

    tile_bytes: bytes one program step moves (a power of two); tiles_per_program: steps per
    program of the full grid; num_warps: per program; streaming: evict-first loads and
    streaming stores; waves: 0 = the full grid (a program per `tiles_per_program` tiles of a
    block), n > 0 = a persistent grid of n programs per SM striding over every tile."""

    tile_bytes: int = 32768
    tiles_per_program: int = 4
    num_warps: int = 8
    streaming: bool = False
    waves: int = 0

    @classmethod
    def parse(cls, spec: str) -> GatherConfig:
        """'tile=16384,tpp=8,warps=4,stream=1,waves=4' (any subset; the rest default)."""
        names = {"tile": "tile_bytes", "tpp": "tiles_per_program", "warps": "num_warps",
                 "stream": "streaming", "waves": "waves"}
        kw: dict = {}
        for part in filter(None, spec.replace("/", ",").split(",")):
            key, _, value = part.partition("=")
            if key not in names or not value.isdigit():
                raise ValueError(f"bad gather config {part!r} in {spec!r} (keys: "
                                 f"{', '.join(names)}; integer values)")
            kw[names[key]] = bool(int(value)) if key == "stream" else int(value)
        return cls(**kw)


# the full grid: 8 steps of 32 KiB per program, streaming cache hints (the pulled bytes are
# not read again soon). On one H100 (session 15, bench/pull_beside_decode.py
# --alone-configs, a pull's blocks at random ids, same run): 90.4% / 93.6% of the same-run
# copy at 4k / 16k tokens, against 85.1% / 92.8% for the cut before it (4 steps, no hints)
DEFAULT_GATHER = GatherConfig(tiles_per_program=8, streaming=True)
# a bounded pull (D's engine busy): the grid measured beside decode steps (+11.7% per step
# with 8 programs beside back-to-back 16k-token pulls on an H200); kept apart from the
# unbounded one's tuning
BOUNDED_GATHER = GatherConfig()

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


class BlockGather:
    """`gather_blocks` from `src_pool` into `dst_pool` (the same contract), with the pools'
    checks and word views done once: each call checks only its ids and launches."""

    def __init__(self, src_pool: torch.Tensor, dst_pool: torch.Tensor,
                 config: GatherConfig | None = None):
        check_device(src_pool, dst_pool)
        if src_pool.shape[1:] != dst_pool.shape[1:] or src_pool.dtype != dst_pool.dtype:
            raise ValueError(f"pools differ per block: {tuple(src_pool.shape)} {src_pool.dtype} "
                             f"vs {tuple(dst_pool.shape)} {dst_pool.dtype}")
        for name, pool in (("src_pool", src_pool), ("dst_pool", dst_pool)):
            if pool.dim() < 2 or not pool[:1].is_contiguous():
                raise ValueError(f"{name}: each block must be one contiguous span")
        self.device = src_pool.device
        self.config = config or DEFAULT_GATHER
        word = _pick_word(src_pool, dst_pool)
        self.src, self.dst = _word_view(src_pool, word), _word_view(dst_pool, word)
        self.words = self.src.shape[1]
        self.strides = (self.src.stride(0), self.dst.stride(0))
        self.sms = sm_count(self.device)
        self.full = self._cut(self.config)
        self.bounded = self._cut(BOUNDED_GATHER)

    def _cut(self, cfg: GatherConfig) -> tuple[int, int, int, bool]:
        """(tile words, tiles per block, tiles per program, even) of a config."""
        if cfg.tile_bytes < 16 or cfg.tile_bytes & (cfg.tile_bytes - 1):
            raise ValueError(f"tile_bytes must be a power of two >= 16, got {cfg.tile_bytes}")
        tile = min(cfg.tile_bytes // self.src.element_size(),
                   triton.next_power_of_2(self.words))
        if interpreting():
            tile = min(tile, 1024)
        num_tiles = triton.cdiv(self.words, tile)
        per_program = max(1, min(cfg.tiles_per_program, num_tiles))
        return tile, num_tiles, per_program, self.words % tile == 0

    def __call__(self, src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor,
                 max_programs: int | None = None) -> None:
        """`max_programs`: at most that many programs (so SMs) move the blocks, each looping
        over its share of tiles (a bounded pull, issue 24); None: the config's grid."""
        for name, ids in (("src_block_ids", src_block_ids), ("dst_block_ids", dst_block_ids)):
            check_index(name, ids, 1)
            if ids.device != self.device:
                raise ValueError(f"{name} on {ids.device}, the pools on {self.device}")
        if src_block_ids.shape != dst_block_ids.shape:
            raise ValueError("src_block_ids and dst_block_ids must have the same length")
        if max_programs is not None and max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        num = src_block_ids.shape[0]
        if num == 0:
            return
        cfg = self.config
        if max_programs is not None:
            cfg, programs = BOUNDED_GATHER, max_programs
            tile, num_tiles, _, even = self.bounded
        elif cfg.waves:
            programs = cfg.waves * self.sms
            tile, num_tiles, _, even = self.full
        else:
            tile, num_tiles, per_program, even = self.full
            grid = (num, triton.cdiv(num_tiles, per_program))
            _gather_blocks_kernel[grid](
                self.src, self.dst, src_block_ids, dst_block_ids, *self.strides, self.words,
                per_program, TILE=tile, EVEN=even and num_tiles % per_program == 0,
                STREAM=cfg.streaming, num_warps=cfg.num_warps,
            )
            return
        total = num * num_tiles
        _gather_blocks_bounded_kernel[(min(programs, total),)](
            self.src, self.dst, src_block_ids, dst_block_ids, *self.strides, self.words,
            num_tiles, total, TILE=tile, EVEN=even, STREAM=cfg.streaming,
            num_warps=cfg.num_warps,
        )


def gather_blocks(
    src_pool: torch.Tensor, src_block_ids: torch.Tensor, dst_pool: torch.Tensor,
    dst_block_ids: torch.Tensor, max_programs: int | None = None,
    config: GatherConfig | None = None,
) -> None:
    """Triton `gather_blocks_ref` (same contract), one launch for all blocks. Both pools
    are on the launching device (a peer's memory is mapped into it) and ids on it too.
    `max_programs`: at most that many programs (so SMs) move the blocks, each looping over
    its share of tiles (a bounded pull, issue 24); None: a grid over every block and tile.
    A caller that copies between the same pools again keeps a `BlockGather` instead."""
    BlockGather(src_pool, dst_pool, config)(src_block_ids, dst_block_ids, max_programs)
