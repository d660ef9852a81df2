"""The tcp plane's pinned staging between GPU pools cuts a batch's bytes into chunks of one
pinned buffer each (kv_transfer/staging.py). The ring itself needs a GPU
(tests/kv_transfer/test_cuda_ipc.py runs it); how the bytes are cut is checked here."""

from __future__ import annotations

import random

import pytest

from pdserve.kv_transfer.staging import byte_runs, chunks


def test_byte_runs_merge_consecutive_blocks_only():
    assert byte_runs([4, 5, 6, 9, 2, 3], 10) == [(40, 30), (90, 10), (20, 20)]
    assert byte_runs([], 10) == []
    assert byte_runs([7, 7], 10) == [(70, 10), (70, 10)]  # a repeat is not a run


@pytest.mark.parametrize("seed", range(20))
def test_chunks_cover_every_byte_in_order_and_fill_each_buffer(seed):
    rng = random.Random(seed)
    block = rng.choice([1, 7, 64])
    ids = rng.sample(range(200), rng.randrange(1, 60))
    size = rng.randrange(1, 5 * block + 3)
    pieces = byte_runs(ids, block)
    cut = chunks(pieces, size)

    def flat(ps):  # the bytes' offsets, in the order they are sent
        return [o for off, n in ps for o in range(off, off + n)]

    assert [o for c in cut for o in flat(c)] == flat(pieces)
    sizes = [sum(n for _, n in c) for c in cut]
    assert all(s == size for s in sizes[:-1]) and 0 < sizes[-1] <= size
    assert all(n > 0 for c in cut for _, n in c)


def test_a_chunk_ends_inside_a_block_and_the_next_goes_on_from_there():
    assert chunks([(0, 10), (50, 10)], 4) == [[(0, 4)], [(4, 4)], [(8, 2), (50, 2)],
                                             [(52, 4)], [(56, 4)]]
