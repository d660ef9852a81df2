"""SiLU-and-mul of the gated MLP: out = silu(gate) * up, with gate and up packed as one tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate first, as the fused gate_up projection packs it) -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
