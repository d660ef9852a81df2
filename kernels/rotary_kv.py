"""Rotary embedding and the KV-cache write in one kernel (one launch per layer, not two).

`rotary_write_kv_ref` is the two references one after the other (`rotary_ref`, then
`write_kv_ref` of the rotated K and the V): the CPU path is unchanged by the fusion.

`rotary_write_kv` (Triton): one program per token loads that position's cos/sin row once,
rotates the token's query heads into a new q, and writes its rotated key heads and its value
heads straight into the token's cache slot (padding slots, < 0, write nothing). The rotation
is `rotary`'s (fp32 with the fp32 cache, rounded once to the destination's dtype) and the V
write is `write_kv`'s copy, so the outputs are bit-equal to `rotary` followed by `write_kv`;
the rotated K never goes through memory except into the cache.
"""

from __future__ import annotations

import torch

from pdserve.kernels.kv_cache import write_kv_ref
from pdserve.kernels.rotary import _rotate_heads, _rotate_token_q, rotary_ref
from pdserve.kernels.triton_utils import check_device, check_index, check_power_of_two, tl, triton


def rotary_write_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, return_k: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hkv, D]: rotate q and k by `positions`, write the rotated k and
    v of `layer` into their slots (slots < 0 skipped); returns the rotated q (return_k: and
    the rotated k, for an attention that reads k from memory rather than the cache)."""
    q, k = rotary_ref(q, k, positions, cos_cache, sin_cache)
    write_kv_ref(kv_cache, layer, k, v, slot_mapping)
    return (q, k) if return_k else q


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, kv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cp,
    stride_cb, stride_ckv, stride_cs, stride_ch,  # kv_ptr: the layer's [NB, 2, bs, Hkv, D]
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, K_OUT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _rotate_token_q(q_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, t, stride_qt,
                               stride_qh, stride_qot, stride_qoh, stride_cp, NUM_Q_HEADS,
                               Q_HEADS_PAD, HALF)
    if K_OUT:  # the rotated k to memory too (every token, padding ones included)
        _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh,
                      cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # a padding token (slot < 0): its q is rotated (the caller drops it) only
        dst = kv_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
        _rotate_heads(k_ptr + t * stride_kt, dst, stride_kh, stride_ch, cos, sin,
                      NUM_KV_HEADS, KV_HEADS_PAD, HALF)
        offs_h = tl.arange(0, KV_HEADS_PAD)[:, None]
        offs_v = tl.arange(0, 2 * HALF)[None, :]
        mask = offs_h < NUM_KV_HEADS
        v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_v, mask=mask)
        tl.store(dst + stride_ckv + offs_h * stride_ch + offs_v, v.to(kv_ptr.dtype.element_ty),
                 mask=mask)


def check_rotary_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """The checks of a rotary + KV write launch (here and in kernels/attention.py's decode
    with the rotation fused in); returns the layer's [NB, 2, bs, Hkv, D] view of the cache."""
    check_device(q, k, v, positions, cos_cache, sin_cache, kv_cache, slot_mapping)
    check_index("positions", positions, 1)
    check_index("slot_mapping", slot_mapping, 1)
    T, num_heads, head_dim = q.shape
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(f"kv_cache must be [NB, L, 2, bs, Hkv, D], got {tuple(kv_cache.shape)}")
    _, num_layers, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != (T, num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [{T}, {num_kv_heads}, {head_dim}], got "
                             f"{tuple(x.shape)}")
    if cache_dim != head_dim or positions.shape[0] != T or slot_mapping.shape[0] != T:
        raise ValueError(f"q {tuple(q.shape)}, positions {tuple(positions.shape)}, slots "
                         f"{tuple(slot_mapping.shape)} and the cache's head_dim {cache_dim} "
                         "disagree")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} layers")
    check_power_of_two("head_dim", head_dim, minimum=2)
    check_power_of_two("block_size", block_size, minimum=1)
    half = head_dim // 2
    for name, c in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if c.dim() != 2 or c.shape[1] != half or c.dtype != torch.float32 or c.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [max_pos, {half}] with unit column stride")
    if cos_cache.stride() != sin_cache.stride():
        raise ValueError("cos_cache and sin_cache must share strides")
    kv = kv_cache[:, layer]  # [NB, 2, bs, Hkv, D], a view
    if kv.stride(-1) != 1:
        raise ValueError("kv_cache's head_dim must be contiguous")
    return kv


def rotary_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, return_k: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton `rotary_write_kv_ref` (same contract; q, k, v may be strided views of a fused
    qkv; the returned q, and k with return_k, are new)."""
    kv = check_rotary_kv(q, k, v, positions, cos_cache, sin_cache, kv_cache, layer, slot_mapping)
    T, num_heads, head_dim = q.shape
    num_kv_heads, block_size, half = kv.shape[3], kv.shape[2], head_dim // 2
    q_in, k_in, v_in = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if return_k else q_out
    if T:
        _rotary_write_kv_kernel[(T,)](
            q_in, k_in, v_in, q_out, k_out, kv, positions, slot_mapping, cos_cache, sin_cache,
            q_in.stride(0), q_in.stride(1), k_in.stride(0), k_in.stride(1),
            v_in.stride(0), v_in.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1),
            cos_cache.stride(0), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
            NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            Q_HEADS_PAD=triton.next_power_of_2(num_heads),
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=half,
            BLOCK_SIZE=block_size, K_OUT=return_k, num_warps=4,
        )
    return (q_out, k_out) if return_k else q_out
