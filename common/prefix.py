"""Prefix-block hashing: the name of a full KV block is a chained hash of (its parent's name,
its token ids). Workers' prefix caches register blocks by these names; the proxy, which has
the token ids, computes the same names to route a prompt where its prefix is cached.

Stable across processes and machines: SHA-256 of the parent's name (8 bytes little-endian,
or 8 x 0xff for the first block) and the block's token ids as little-endian int32.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Named in the compatibility record: P, D and the proxy must agree on it.
PREFIX_HASH_FUNCTION = "sha256-int32le-chain-64/v1"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The 64-bit name of one full block given its parent's name (None for the first block)."""
    h = hashlib.sha256()
    h.update(b"\xff" * 8 if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(h.digest()[:8], "little")


def prefix_block_hashes(
    token_ids: Sequence[int], block_size: int, start: list[int] | None = None
) -> list[int]:
    """Hashes of every *full* block of `token_ids`; `start` (already computed hashes of the
    leading blocks) is extended and returned, so callers can hash incrementally."""
    hashes = list(start) if start else []
    parent = hashes[-1] if hashes else None
    for b in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block_tokens(parent, token_ids[b * block_size : (b + 1) * block_size])
        hashes.append(parent)
    return hashes
