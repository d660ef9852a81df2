"""Rotary position embedding (rotate-half form, as Llama-family checkpoints expect).

cos/sin caches come from `engine/rope.py` ([max_positions, head_dim // 2], fp32), so llama3 and
linear scaling live in the cache, not here.

`rotary` (Triton): one program per token rotates all its query and key heads with one load of
that position's cos/sin row. The rotation is computed in fp32 with the fp32 cache and rounded
once to the output dtype (the reference rounds cos/sin and each product to a 16-bit dtype;
for fp32 the two agree to rounding).
"""

from __future__ import annotations

import torch

from pdserve.kernels.triton_utils import check_device, check_index, check_power_of_two, tl, triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, 1, D/2]. The same products and sums as transformers'
    # x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), so fp32 results are bit-equal.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated (q, k), same dtypes."""
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_xh, stride_oh, cos, sin, num_heads,
                  HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    """Rotate [num_heads, 2 * HALF] rows at x_ptr into out_ptr; cos/sin [1, HALF] fp32."""
    offs_h = tl.arange(0, HEADS_PAD)[:, None]
    offs_d = tl.arange(0, HALF)[None, :]
    mask = offs_h < num_heads
    x_lo = x_ptr + offs_h * stride_xh + offs_d
    x1 = tl.load(x_lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_lo + HALF, mask=mask, other=0.0).to(tl.float32)
    o_lo = out_ptr + offs_h * stride_oh + offs_d
    dtype = out_ptr.dtype.element_ty
    tl.store(o_lo, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(o_lo + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotate_token_q(q_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, t, stride_qt, stride_qh,
                    stride_qot, stride_qoh, stride_cp, NUM_Q_HEADS: tl.constexpr,
                    Q_HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    """Token `t`: rotate its query heads; returns its cos/sin rows ([1, HALF] fp32) for
    the key heads (`_rotary_kernel` and kernels/rotary_kv.py's fused kernel)."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cp + offs_d)
    sin = tl.load(sin_ptr + pos * stride_cp + offs_d)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh,
                  cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cp,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _rotate_token_q(q_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, t, stride_qt,
                               stride_qh, stride_qot, stride_qoh, stride_cp, NUM_Q_HEADS,
                               Q_HEADS_PAD, HALF)
    _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh,
                  cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `rotary_ref` (same contract; q, k may be strided views, outputs are new)."""
    check_device(q, k, positions, cos_cache, sin_cache)
    check_index("positions", positions, 1)
    T, num_heads, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != T or k.shape[2] != head_dim or positions.shape[0] != T:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions "
                         f"{tuple(positions.shape)} disagree")
    half = head_dim // 2
    check_power_of_two("head_dim", head_dim, minimum=2)
    for name, c in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if c.dim() != 2 or c.shape[1] != half or c.dtype != torch.float32 or c.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [max_pos, {half}] with unit column stride")
    if cos_cache.stride() != sin_cache.stride():
        raise ValueError("cos_cache and sin_cache must share strides")
    q_in = q if q.stride(-1) == 1 else q.contiguous()
    k_in = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        _rotary_kernel[(T,)](
            q_in, k_in, q_out, k_out, positions, cos_cache, sin_cache,
            q_in.stride(0), q_in.stride(1), k_in.stride(0), k_in.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_cache.stride(0),
            NUM_Q_HEADS=num_heads, NUM_KV_HEADS=k.shape[1],
            Q_HEADS_PAD=triton.next_power_of_2(num_heads),
            KV_HEADS_PAD=triton.next_power_of_2(k.shape[1]), HALF=half, num_warps=4,
        )
    return q_out, k_out
