"""Block manager contracts, with no tensors: ref counts, prefix hits, can_* -> act."""

from __future__ import annotations

import random

import pytest

from pdserve.common.prefix import hash_block_tokens, prefix_block_hashes
from pdserve.engine.block_manager import BlockManager

BS = 16


def toks(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_allocate_and_free_counts_blocks():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = bm.allocate(toks(33))  # 3 blocks
    assert len(a.block_table) == 3 and a.num_cached_tokens == 0
    assert bm.num_free_blocks == 7
    assert all(bm.ref_count(b) == 1 for b in a.block_table)
    bm.free(a.block_table)
    assert bm.num_free_blocks == 10
    assert all(bm.ref_count(b) == 0 for b in a.block_table)


def test_num_slots_reserves_room_beyond_the_prompt():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = bm.allocate(toks(5), num_slots=40)
    assert len(a.block_table) == 3


def test_can_allocate_is_exact():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    assert bm.can_allocate(toks(64))
    assert not bm.can_allocate(toks(65))
    with pytest.raises(MemoryError):
        bm.allocate(toks(65))
    assert bm.num_free_blocks == 4  # a refused allocation takes nothing


def test_can_allocate_then_allocate_always_succeeds_random_workload():
    """Contract under a random mix of allocations, appends, forks and frees with prefix
    caching on: every can_* answer is honoured and the books balance at the end."""
    rng = random.Random(7)
    bm = BlockManager(num_blocks=64, block_size=BS)
    prefixes = [toks(48, s) for s in range(3)]
    live: list[list[int]] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.45:
            ids = rng.choice(prefixes)[: rng.randrange(1, 48)] + toks(rng.randrange(0, 40), step)
            if not ids:
                continue
            if bm.can_allocate(ids):
                a = bm.allocate(ids)
                bm.mark_computed(a.block_table, prefix_block_hashes(ids, BS), len(ids))
                live.append(a.block_table)
        elif op < 0.6 and live:
            table = rng.choice(live)
            n = len(table) * BS + rng.randrange(1, 40)
            if bm.can_append(table, n):
                new = bm.append(table, n)
                assert len(table) == bm.num_blocks_for(n) and len(new) >= 1
        elif op < 0.7 and live:
            table = rng.choice(live)
            n = len(table) * BS - rng.randrange(0, BS)
            if bm.can_fork(n):
                live.append(bm.fork(table, n)[0])
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        held = {b for t in live for b in t}
        assert bm.num_free_blocks == 64 - len(held)
    for t in live:
        bm.free(t)
    assert bm.num_free_blocks == 64
    assert all(bm.ref_count(b) == 0 for b in range(64))


def test_prefix_hit_reuses_full_computed_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = toks(40)
    a = bm.allocate(prompt)
    # nothing registered until the KV is written
    assert bm.allocate(prompt).num_cached_tokens == 0
    bm.mark_computed(a.block_table, prefix_block_hashes(prompt, BS), 40)
    b = bm.allocate(prompt + toks(10, 1))
    assert b.num_cached_tokens == 32  # two full blocks; the partial third is private
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.ref_count(a.block_table[0]) == 2
    assert b.block_table[2] != a.block_table[2]
    assert bm.num_prefix_hits == 32


def test_last_prompt_token_is_always_computed():
    """A prompt that is entirely cached still leaves its last block to compute: its logits
    give the first output token."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = toks(32)
    a = bm.allocate(prompt)
    bm.mark_computed(a.block_table, prefix_block_hashes(prompt, BS), 32)
    bm.free(a.block_table)
    b = bm.allocate(prompt)
    assert b.num_cached_tokens == 16


def test_freed_cached_blocks_are_evictable_and_counted_free():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = toks(64)
    a = bm.allocate(prompt)
    bm.mark_computed(a.block_table, prefix_block_hashes(prompt, BS), 64)
    bm.free(a.block_table)
    assert bm.num_free_blocks == 4
    b = bm.allocate(prompt[:33])  # 2 hits + 1 new
    assert b.num_cached_tokens == 32
    bm.free(b.block_table)
    # an unrelated allocation evicts cached blocks (tail first) rather than failing
    c = bm.allocate(toks(64, 3))
    assert len(c.block_table) == 4
    bm.free(c.block_table)
    assert bm.allocate(prompt[:33]).num_cached_tokens == 0  # evicted


def test_can_allocate_counts_evictable_hits_once():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = toks(48)
    a = bm.allocate(prompt)
    bm.mark_computed(a.block_table, prefix_block_hashes(prompt, BS), 48)
    bm.free(a.block_table)
    longer = prompt + toks(40, 2)  # 3 hits (evictable) + 3 new blocks = 6 > 4
    assert not bm.can_allocate(longer)
    with pytest.raises(MemoryError):
        bm.allocate(longer)
    assert bm.num_free_blocks == 4


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = bm.allocate(toks(20))  # one full block + a partial one
    f, copy = bm.fork(a.block_table, 20)
    assert f[0] == a.block_table[0] and bm.ref_count(f[0]) == 2
    assert f[1] != a.block_table[1] and bm.ref_count(f[1]) == 1
    assert copy == (a.block_table[1], f[1])
    bm.free(a.block_table)
    assert bm.num_free_blocks == 6
    bm.free(f)
    assert bm.num_free_blocks == 8


def test_fork_on_a_block_boundary_copies_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = bm.allocate(toks(32))
    f, copy = bm.fork(a.block_table, 32)
    assert f == a.block_table and copy is None
    assert bm.can_fork(32)


def test_fork_without_room_for_the_copy_is_refused_cleanly():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = bm.allocate(toks(20))
    assert not bm.can_fork(20)
    with pytest.raises(MemoryError):
        bm.fork(a.block_table, 20)
    assert bm.ref_count(a.block_table[0]) == 1  # the refused fork took nothing


def test_double_free_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = bm.allocate(toks(5))
    bm.free(a.block_table)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(a.block_table)


def test_hashes_are_stable_and_chained():
    # a fixed value: the proxy and every worker, on any machine, must compute the same name
    assert hash_block_tokens(None, list(range(16))) == hash_block_tokens(None, list(range(16)))
    h = prefix_block_hashes(list(range(40)), BS)
    assert len(h) == 2
    assert h[1] == hash_block_tokens(h[0], list(range(16, 32)))
    # same block content after a different prefix gets a different name
    assert prefix_block_hashes([5] * 16 + list(range(16)), BS)[1] != hash_block_tokens(None, list(range(16)))
    # incremental hashing equals hashing from scratch
    assert prefix_block_hashes(list(range(40)), BS, start=h[:1]) == h


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = toks(40)
    a = bm.allocate(prompt)
    bm.mark_computed(a.block_table, prefix_block_hashes(prompt, BS), 40)
    assert bm.allocate(prompt).num_cached_tokens == 0
