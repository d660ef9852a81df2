"""`prefix_block_hashes` (ids packed once, the proxy's per-request path) names every block
exactly as the block-by-block definition `hash_block_tokens` does: with and without a salt,
extended from any number of known leading hashes; and a pinned name, so the definition
itself (in the compatibility record) cannot drift unnoticed."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from pdserve.common.prefix import hash_block_tokens, prefix_block_hashes


def chain(ids: list[int], bs: int, start: list[int] | None = None,
          salt: str | None = None) -> list[int]:
    hashes = list(start or [])
    parent = hashes[-1] if hashes else None
    for b in range(len(hashes), len(ids) // bs):
        parent = hash_block_tokens(parent, ids[b * bs:(b + 1) * bs], salt if b == 0 else None)
        hashes.append(parent)
    return hashes


@pytest.mark.parametrize("seed", range(3))
def test_packed_hashing_equals_block_by_block(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.randrange(2**31) for _ in range(rng.randrange(0, 120))]
        bs = rng.choice([1, 3, 16])
        salt = rng.choice([None, "tenant-a", "ünïcode"])
        want = chain(ids, bs, None, salt)
        assert prefix_block_hashes(ids, bs, cache_salt=salt) == want
        k = rng.randrange(len(want) + 1)
        assert prefix_block_hashes(ids, bs, want[:k], salt) == want


def test_the_definition_is_pinned() -> None:
    ids = list(range(16))
    digest = hashlib.sha256(b"\xff" * 8 + struct.pack("<16i", *ids)).digest()
    assert prefix_block_hashes(ids, 16) == [int.from_bytes(digest[:8], "little")]
    with pytest.raises((OverflowError, struct.error)):
        prefix_block_hashes([2**31] * 16, 16)
