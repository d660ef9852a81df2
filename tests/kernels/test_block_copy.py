"""gather_blocks: whole-block copies between pools (or within one) in one launch, bit-exact."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.block_copy import (
    BlockGather,
    GatherConfig,
    gather_blocks,
    gather_blocks_ref,
)
from tests.kernels.paged import seed_for

PLACES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
# per-block layouts [L, 2, bs, Hkv, D]: spans copied as words of 8, 4 (12-byte span) and
# 2 bytes (6-byte span); spans that do and do not divide the copy tile
LAYOUTS = [
    ((2, 2, 16, 2, 16), torch.float16),
    ((1, 2, 1, 1, 3), torch.float16),
    ((1, 1, 1, 3, 1), torch.float16),
    ((1, 2, 16, 3, 16), torch.float32),
    ((3, 2, 32, 1, 33), torch.float16),
    ((4, 2, 16, 8, 128), torch.bfloat16),
]


def pool(num_blocks, layout, dtype, device, gen):
    return torch.randn(num_blocks, *layout, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("device", PLACES)
@pytest.mark.parametrize("layout,dtype", LAYOUTS, ids=lambda x: str(x))
def test_gather_between_pools(device, layout, dtype, request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    src = pool(10, layout, dtype, device, gen)
    dst = torch.full((13, *layout), float("nan"), dtype=dtype, device=device)  # poisoned
    src_ids = torch.randperm(10, generator=gen)[:6].to(device)
    dst_ids = torch.randperm(13, generator=gen)[:6].to(device)
    want = dst.clone()
    gather_blocks_ref(src, src_ids, want, dst_ids)
    gather_blocks(src, src_ids, dst, dst_ids)
    # bit-exact: compare the raw bytes (NaN in the untouched blocks compares equal too)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    assert not dst[dst_ids].isnan().any()


def gather_7_of_9(request, device, layout, dtype, **kw):
    """7 of 9 random blocks into 7 of 11 NaN-poisoned ones with `gather_blocks(**kw)`,
    checked bit-exact against the reference; returns (src, src_ids, dst, dst_ids)."""
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    src = pool(9, layout, dtype, device, gen)
    dst = torch.full((11, *layout), float("nan"), dtype=dtype, device=device)
    src_ids = torch.randperm(9, generator=gen)[:7].int().to(device)
    dst_ids = torch.randperm(11, generator=gen)[:7].int().to(device)
    want = dst.clone()
    gather_blocks_ref(src, src_ids, want, dst_ids)
    gather_blocks(src, src_ids, dst, dst_ids, **kw)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    return src, src_ids, dst, dst_ids


@pytest.mark.parametrize("device", PLACES)
@pytest.mark.parametrize("programs", [1, 3, 1000])
@pytest.mark.parametrize("layout,dtype", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[4]], ids=str)
def test_a_bounded_gather_copies_every_tile_with_few_programs(device, programs, layout, dtype,
                                                              request):
    """`max_programs`: a fixed grid whose programs stride over every (block, tile), so a
    pull can be held to a few SMs; the same bytes as the full grid's, whatever the count."""
    src, src_ids, dst, dst_ids = gather_7_of_9(request, device, layout, dtype,
                                               max_programs=programs)
    with pytest.raises(ValueError, match="max_programs"):
        gather_blocks(src, src_ids, dst, dst_ids, max_programs=0)


@pytest.mark.parametrize("device", PLACES)
def test_gather_within_one_pool_and_int32_ids(device, request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    layout, dtype = LAYOUTS[0]
    p = pool(12, layout, dtype, device, gen)
    ids = torch.randperm(12, generator=gen)
    src_ids, dst_ids = ids[:5].int().to(device), ids[5:10].int().to(device)  # disjoint
    want = p.clone()
    gather_blocks_ref(want, src_ids, want, dst_ids)
    gather_blocks(p, src_ids, p, dst_ids)
    assert torch.equal(p.view(torch.uint8), want.view(torch.uint8))


def test_gather_refuses_mismatched_pools():
    a = torch.zeros(4, 1, 2, 16, 2, 16)
    with pytest.raises(ValueError, match="per block"):
        gather_blocks(a, torch.tensor([0]), torch.zeros(4, 1, 2, 16, 2, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="same length"):
        gather_blocks(a, torch.tensor([0, 1]), a.clone(), torch.tensor([1]))


CONFIGS = ["", "stream=1", "tile=16384,tpp=8,warps=4", "tile=65536,tpp=1,stream=1",
           "waves=2", "waves=1,tile=16384,stream=1,warps=4"]


@pytest.mark.parametrize("device", PLACES)
@pytest.mark.parametrize("spec", CONFIGS)
@pytest.mark.parametrize("layout,dtype", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[4]], ids=str)
def test_every_grid_config_copies_the_same_bytes(device, spec, layout, dtype, request):
    """The full grid's cut (tile, steps per program, warps), the streaming cache hints and
    the persistent grid change how the bytes move, never which: bit-exact for each."""
    gather_7_of_9(request, device, layout, dtype, config=GatherConfig.parse(spec))


@pytest.mark.parametrize("device", PLACES)
def test_a_block_gather_reused_across_pulls(device, request):
    """One BlockGather (pools checked once) serving successive pulls of other ids, full and
    bounded, writes each pull's blocks and nothing else."""
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    layout, dtype = LAYOUTS[0]
    src = pool(16, layout, dtype, device, gen)
    dst = torch.full((16, *layout), float("nan"), dtype=dtype, device=device)
    want = dst.clone()
    g = BlockGather(src, dst)
    perm = torch.randperm(16, generator=gen)
    for k, bounded in ((0, None), (1, 2), (2, None)):
        s = perm[k * 5:(k + 1) * 5].int()
        d = torch.randperm(16, generator=gen)[k * 5:(k + 1) * 5].int()
        gather_blocks_ref(src, s.to(device), want, d.to(device))
        g(s.to(device), d.to(device), max_programs=bounded)
        assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(ValueError, match="same length"):
        g(s.to(device), d[:2].to(device))
    with pytest.raises(ValueError, match="int32/int64"):
        g(s.float().to(device), d.to(device))


def test_gather_config_parse():
    assert GatherConfig.parse("") == GatherConfig()
    assert GatherConfig.parse("tile=16384,tpp=8,warps=4,stream=1,waves=2") == GatherConfig(
        tile_bytes=16384, tiles_per_program=8, num_warps=4, streaming=True, waves=2)
    assert GatherConfig.parse("stream=1/waves=4") == GatherConfig(streaming=True, waves=4)
    for bad in ("tiles=4", "tile=big", "warps"):
        with pytest.raises(ValueError, match="bad gather config"):
            GatherConfig.parse(bad)
    a = torch.zeros(4, 1, 2, 16, 2, 16)
    with pytest.raises(ValueError, match="power of two"):
        BlockGather(a, a.clone(), GatherConfig(tile_bytes=3000))
