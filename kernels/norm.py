"""RMSNorm with an optional fused residual add, in the order Llama-family models use.

The decoder adds the residual *before* normalising; fusing the add saves one pass over the
hidden states. The variance is taken in fp32 whatever the input dtype (as transformers does).
"""

from __future__ import annotations

import torch


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
