"""KV write by slot mapping into the block-major pool.

Pool layout (DESIGN.md §2): [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim],
so one block (all layers, K and V) is one contiguous span and moves as one copy.
Token t of a batch goes to slot `slot_mapping[t]` = block_id * block_size + offset.

`write_kv` (Triton): one program per token writes that token's K and V rows
([num_kv_heads, head_dim] each, contiguous in the pool) with vector stores; padding slots
(< 0) return at once. The write is a copy, so it is bit-exact against the reference.
"""

from __future__ import annotations

import torch

from pdserve.kernels.triton_utils import check_device, check_index, check_power_of_two, tl, triton


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


@triton.jit
def _write_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slot_ptr,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,  # kv_ptr: the layer's [NB, 2, bs, Hkv, D]
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return  # padding token
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < NUM_KV_HEADS)[:, None]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask)
    dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
           + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv(
    kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton `write_kv_ref` (same contract). k/v may be strided views (of a fused qkv)."""
    check_device(kv_cache, k, v, slot_mapping)
    check_index("slot_mapping", slot_mapping, 1)
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(f"kv_cache must be [NB, L, 2, bs, Hkv, D], got {tuple(kv_cache.shape)}")
    _, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    T = slot_mapping.shape[0]
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != (T, num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [{T}, {num_kv_heads}, {head_dim}], got {tuple(x.shape)}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} layers")
    check_power_of_two("block_size", block_size)
    check_power_of_two("head_dim", head_dim, minimum=1)
    if T == 0:
        return
    kv = kv_cache[:, layer]
    _write_kv_kernel[(T,)](
        kv, k, v, slot_mapping, *kv.stride(), *k.stride(), *v.stride(),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, num_warps=4,
    )
