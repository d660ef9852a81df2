"""Prefix-block hashing: the name of a full KV block is a chained hash of (its parent's name,
its token ids). Workers' prefix caches register blocks by these names; the proxy, which has
the token ids, computes the same names to route a prompt where its prefix is cached.

Stable across processes and machines: SHA-256 of the parent's name (8 bytes little-endian,
or 8 x 0xff for the first block) and the block's token ids as little-endian int32.

A request's `cache_salt` (vLLM's request field) separates tenants: it is hashed into the first
block's name only (after its token ids, as UTF-8), and the chain carries it into every later
block, so the same prompt under two salts, or under a salt and none, shares no block, in a
worker's cache or in the proxy's routing. Without a salt the names are exactly those above.
A salted first block's input is longer than any unsalted one (8 + 4 x block_size bytes), so
the two kinds of name cannot coincide short of a SHA-256 collision.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from hashlib import sha256

# Named in the compatibility record: P, D and the proxy must agree on it.
PREFIX_HASH_FUNCTION = "sha256-int32le-chain-64/v1"

_FIRST = b"\xff" * 8  # the parent name of a first block
_BIG_ENDIAN = sys.byteorder != "little"
assert array("i").itemsize == 4, "token ids are hashed as int32"

# A salt is a tenant's secret, not a document: vLLM asks for ~43 characters (256 bits, base64).
MAX_CACHE_SALT_CHARS = 256


def check_cache_salt(cache_salt: object) -> None:
    """Raise ValueError unless `cache_salt` is None or a non-empty string of at most
    MAX_CACHE_SALT_CHARS characters that UTF-8 can encode (vLLM refuses an empty one too)."""
    if cache_salt is None:
        return
    if not isinstance(cache_salt, str) or not 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt must be a non-empty string of at most "
                         f"{MAX_CACHE_SALT_CHARS} characters")
    try:
        cache_salt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"cache_salt is not valid Unicode text ({e.reason})") from None


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int],
                      cache_salt: str | None = None) -> int:
    """The 64-bit name of one full block given its parent's name (None for the first block).
    `cache_salt` is passed for the first block only (`prefix_block_hashes` does)."""
    h = hashlib.sha256()
    h.update(b"\xff" * 8 if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    if cache_salt:
        h.update(cache_salt.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little")


def prefix_block_hashes(
    token_ids: Sequence[int], block_size: int, start: list[int] | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """Hashes of every *full* block of `token_ids`; `start` (already computed hashes of the
    leading blocks, under the same `cache_salt`) is extended and returned, so callers can
    hash incrementally. The same names as `hash_block_tokens` block by block, with the ids
    packed once (the proxy hashes every prompt on its request path)."""
    hashes = list(start) if start else []
    first, n = len(hashes), len(token_ids) // block_size
    if first >= n:
        return hashes
    data = array("i", token_ids[first * block_size:n * block_size])  # OverflowError as struct
    if _BIG_ENDIAN:
        data.byteswap()
    packed, step = data.tobytes(), 4 * block_size
    parent = hashes[-1].to_bytes(8, "little") if hashes else _FIRST
    for b in range(first, n):
        block = packed[(b - first) * step:(b - first + 1) * step]
        if b == 0 and cache_salt:
            block += cache_salt.encode("utf-8")
        parent = sha256(parent + block).digest()[:8]
        hashes.append(int.from_bytes(parent, "little"))
    return hashes
