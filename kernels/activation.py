"""SiLU-and-mul of the gated MLP: out = silu(gate) * up, with gate and up packed as one tensor.

`silu_and_mul` (Triton): one pass over gate_up instead of torch's three (silu, split, mul);
programs tile (token, column block). Math in fp32, rounded to the input dtype after the silu
and after the product, as torch rounds, so 16-bit results match the reference closely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.triton_utils import check_device, tl, triton


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate first, as the fused gate_up projection packs it) -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, inter_size, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter_size
    row = x_ptr + t.to(tl.int64) * stride_xt
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter_size + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # rounded as torch's silu
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs, (silu * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton `silu_and_mul_ref` (same contract)."""
    check_device(gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [T, 2 * I] with unit column stride, got "
                         f"{tuple(gate_up.shape)} strides {gate_up.stride()}")
    T, inter_size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((T, inter_size), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or inter_size == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter_size))
    _silu_and_mul_kernel[(T, triton.cdiv(inter_size, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter_size, BLOCK=block, num_warps=4,
    )
    return out
