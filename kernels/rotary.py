"""Rotary position embedding (rotate-half form, as Llama-family checkpoints expect).

cos/sin caches come from `engine/rope.py` ([max_positions, head_dim // 2], fp32), so llama3 and
linear scaling live in the cache, not here.
"""

from __future__ import annotations

import torch


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
