"""KV write by slot mapping into the block-major pool.

Pool layout (DESIGN.md §2): [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim],
so one block (all layers, K and V) is one contiguous span and moves as one copy.
Token t of a batch goes to slot `slot_mapping[t]` = block_id * block_size + offset.
"""

from __future__ import annotations

import torch


def write_kv_ref(
    kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [T, Hkv, D] of `layer` into their slots. Slots < 0 are skipped (padding)."""
    block_size = kv_cache.shape[3]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, layer, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, layer, 1, offsets] = v.to(kv_cache.dtype)
