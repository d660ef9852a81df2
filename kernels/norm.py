"""RMSNorm with an optional fused residual add, in the order Llama-family models use.

The decoder adds the residual *before* normalising; fusing the add saves one pass over the
hidden states. The variance is taken in fp32 whatever the input dtype (as transformers does).

`rms_norm` (Triton): one program per token row holds the whole row in registers, so the add,
the fp32 sum of squares and the scaling are one read and one or two writes. Roundings follow
the reference: the sum x + residual and the normalised row round to the input dtype before
the weight multiplies.
"""

from __future__ import annotations

import torch

from pdserve.kernels.triton_utils import check_device, tl, triton


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (+ residual [T, H]) -> (normed [T, H], new residual = x + residual, or x)."""
    if residual is not None:
        x = residual + x
    dtype = x.dtype
    h = x.float()
    variance = h.pow(2).mean(-1, keepdim=True)  # fp32 accumulate
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype), x


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_xt, stride_rt, stride_ot, stride_rot,
    hidden_size, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    x = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_rt + offs, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # rounded as torch's add
        tl.store(res_out_ptr + t * stride_rot + offs, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, 0) / hidden_size  # fp32 accumulate
    normed = (h * (1.0 / tl.sqrt(variance + eps))).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `rms_norm_ref` (same contract; the new residual is a new tensor, inputs are
    never written)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    check_device(*tensors)
    H = x.shape[-1]
    if weight.shape != (H,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"weight must be [{H}] and residual like x {tuple(x.shape)}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual ({residual.dtype}) and x ({x.dtype}) must share a dtype")
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out = torch.empty((T, H), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_in = res_out = x2  # unused without a residual
    if residual is not None:
        res_in = residual.reshape(-1, H)
        if res_in.stride(-1) != 1:
            res_in = res_in.contiguous()
        res_out = torch.empty_like(x2)
    if T:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(T,)](
            x2, res_in, weight.contiguous(), out, res_out,
            x2.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0), H, eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 256)),
        )
    new_residual = x if residual is None else res_out.view(x.shape)
    return out.view(x.shape), new_residual
