"""Block manager: owns KV block *ids*, reference counts and the prefix cache; no tensors.

The pool (`engine/kv_pool.py`) owns the memory; this class only decides which block ids a
sequence uses. A sequence's `block_table` lists its block ids in order; slot
`block_table[i // block_size] * block_size + i % block_size` holds token i's KV.

Prefix caching: once every token of a block has its KV written, the block is named by a
chained hash of (parent block's hash, the block's token ids; the request's cache salt for the
first block) and registered. A later prompt with the same leading tokens (and the same salt)
takes those blocks by reference instead of recomputing them. A registered block whose
reference count drops to 0 stays cached ("evictable") until a new allocation needs the
space; eviction is least-recently-freed first, tail blocks before head blocks, so a long
shared prefix survives longest.

The names come from `common/prefix.py`, which the proxy uses too, to route by prefix.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.common.prefix import prefix_block_hashes


@dataclass(frozen=True)
class Allocation:
    """Result of `allocate`: the new block table and how many leading tokens are cached."""

    block_table: list[int]
    num_cached_tokens: int


class BlockManager:
    """Block ids, reference counts and the prefix cache of one KV pool.

    Contract: after `can_allocate(...)` returns True, the same `allocate(...)` succeeds; after
    `can_append(...)` returns True, the same `append(...)` succeeds. Whoever holds a block
    table frees it exactly once with `free`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # hash -> block id of every registered block (in use or evictable)
        self._cached: dict[int, int] = {}
        # block id -> None, oldest first: registered blocks with ref count 0
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_prefix_queries = 0  # tokens looked up, as vLLM counts prefix-cache queries
        self.num_prefix_hits = 0  # tokens found

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now: never used, or cached with no reader."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def _prefix_hits(self, token_ids: Sequence[int], block_hashes: Sequence[int] | None) -> list[int]:
        """Cached block ids of the longest cached prefix. At least one prompt token is always
        left to compute: its logits give the first output token. `block_hashes` None: the
        unsalted names of `token_ids` (a salted request passes its own, as the scheduler does)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        if block_hashes is None:
            block_hashes = prefix_block_hashes(token_ids[: max_blocks * self.block_size], self.block_size)
        hits = []
        for h in block_hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(
        self, token_ids: Sequence[int], num_slots: int | None = None,
        block_hashes: Sequence[int] | None = None,
    ) -> bool:
        """Whether `allocate(token_ids, num_slots)` would succeed now. No side effects."""
        hits = self._prefix_hits(token_ids, block_hashes)
        num_new = self.num_blocks_for(num_slots or len(token_ids)) - len(hits)
        # cached hits with no reader are counted in num_free_blocks but are not free for us
        num_hits_evictable = sum(1 for b in hits if self._ref_counts[b] == 0)
        return num_new <= self.num_free_blocks - num_hits_evictable

    # ---- actions -------------------------------------------------------------------------

    def allocate(
        self, token_ids: Sequence[int], num_slots: int | None = None,
        block_hashes: Sequence[int] | None = None,
    ) -> Allocation:
        """Blocks for a new sequence of `token_ids` with room for `num_slots` tokens
        (default: the tokens themselves). Leading full blocks come from the prefix cache when
        they are there. Raises MemoryError if `can_allocate` is False."""
        if not self.can_allocate(token_ids, num_slots, block_hashes):
            raise MemoryError("not enough free KV blocks")
        hits = self._prefix_hits(token_ids, block_hashes)
        if self.enable_prefix_caching:
            self.num_prefix_queries += len(token_ids)
            self.num_prefix_hits += len(hits) * self.block_size
        for b in hits:
            self._take(b)
        num_new = self.num_blocks_for(num_slots or len(token_ids)) - len(hits)
        table = hits + [self._take_free() for _ in range(num_new)]
        return Allocation(block_table=table, num_cached_tokens=len(hits) * self.block_size)

    def can_append(self, block_table: Sequence[int], num_tokens: int) -> bool:
        """Whether `append(block_table, num_tokens)` would succeed now."""
        return self.num_blocks_for(num_tokens) - len(block_table) <= self.num_free_blocks

    def append(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Grow `block_table` in place to hold `num_tokens` tokens; returns the new block ids."""
        num_new = self.num_blocks_for(num_tokens) - len(block_table)
        if num_new > self.num_free_blocks:
            raise MemoryError("not enough free KV blocks")
        new = [self._take_free() for _ in range(max(num_new, 0))]
        block_table.extend(new)
        return new

    def can_fork(self, num_tokens: int) -> bool:
        """Whether `fork(table, num_tokens)` would succeed now (a partial last block needs
        one free block for its copy)."""
        return num_tokens % self.block_size == 0 or self.num_free_blocks >= 1

    def fork(self, block_table: Sequence[int], num_tokens: int) -> tuple[list[int], tuple[int, int] | None]:
        """A block table for one more holder of the first `num_tokens` tokens (n > 1 choices).

        Full blocks are shared by reference count; a partial last block is copied on write:
        the fork gets a fresh block and the caller copies the KV (returned as (src, dst))
        before either holder writes into it."""
        num_full = num_tokens // self.block_size
        shared = list(block_table[:num_full])
        for b in shared:
            self._take(b)
        if num_tokens % self.block_size == 0:
            return shared, None
        if self.num_free_blocks < 1:
            self.free(shared)
            raise MemoryError("not enough free KV blocks")
        dst = self._take_free()
        return shared + [dst], (block_table[num_full], dst)

    def mark_computed(
        self, block_table: Sequence[int], block_hashes: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Register the full blocks whose KV is now written, so later prompts can reuse them.

        Called by the scheduler after the step that wrote tokens [.., num_computed_tokens).
        `block_hashes` are the sequence's full-block hashes (`prefix_block_hashes`)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(block_hashes), len(block_table))
        for i in range(num_full):
            b, h = block_table[i], block_hashes[i]
            if self._block_hash[b] is not None:
                continue
            if h in self._cached:
                continue  # another block already holds this content; this one stays private
            self._block_hash[b] = h
            self._cached[h] = b

    def free(self, block_table: Sequence[int]) -> None:
        """Drop one reference to each block. Tail blocks are released first, so that they are
        evicted before the shared heads of a prefix."""
        for b in reversed(block_table):
            rc = self._ref_counts[b]
            if rc <= 0:
                raise RuntimeError(f"block {b} freed more often than taken")
            self._ref_counts[b] = rc - 1
            if rc == 1:
                if self._block_hash[b] is None:
                    self._free.append(b)
                else:
                    self._evictable[b] = None

    # ---- internals -----------------------------------------------------------------------

    def _take(self, b: int) -> None:
        if self._ref_counts[b] == 0:
            self._evictable.pop(b, None)
        self._ref_counts[b] += 1

    def _take_free(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)  # least recently freed
            self._uncache(b)
        self._ref_counts[b] = 1
        return b

    def _uncache(self, b: int) -> None:
        h = self._block_hash[b]
        if h is not None:
            del self._cached[h]
            self._block_hash[b] = None
