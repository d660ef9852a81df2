"""The shm data plane's block copy (kv_transfer/shm.py `copy_blocks`): runs of blocks
consecutive in both pools, per-run copies spread over threads for large transfers, the same
bytes as an indexed gather-scatter, and a clear error for ids outside a pool."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.kv_transfer import shm


@pytest.mark.parametrize("block_elems", [64, 1 << 20], ids=["small-inline", "large-threaded"])
def test_same_bytes_as_an_indexed_copy(block_elems, monkeypatch):
    monkeypatch.setattr(shm, "_COPY_THREADS", 3)  # the threaded path, whatever the machine
    rng = random.Random(5)
    src = torch.randint(-1000, 1000, (40, block_elems), dtype=torch.int16)
    dst = torch.zeros(48, block_elems, dtype=torch.int16)
    # random ids with a run consecutive on both sides (merged into one copy) in the middle
    s_ids = rng.sample(range(0, 20), 6) + [30, 31, 32, 33] + rng.sample(range(20, 30), 5)
    d_ids = rng.sample(range(0, 24), 6) + [40, 41, 42, 43] + rng.sample(range(24, 40), 5)
    assert (40, 30, 4) in shm._runs(d_ids, s_ids)
    want = dst.clone()
    want[torch.tensor(d_ids)] = src[torch.tensor(s_ids)]
    shm.copy_blocks(dst, d_ids, src, s_ids)
    assert torch.equal(dst, want)


def test_ids_outside_a_pool_are_refused_before_any_copy():
    src, dst = torch.ones(4, 8), torch.zeros(4, 8)
    for d_ids, s_ids, side in (([0, 4], [0, 1], "destination"), ([0, 1], [-1, 2], "source")):
        with pytest.raises(IndexError, match=side):
            shm.copy_blocks(dst, d_ids, src, s_ids)
    assert not dst.any()
    with pytest.raises(ValueError, match="3 destination blocks for 2"):
        shm.copy_blocks(dst, [0, 1, 2], src, [0, 1])
