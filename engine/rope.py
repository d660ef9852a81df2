"""Rotary position embedding tables: inverse frequencies and the cos/sin cache.

This module owns the numbers the attention layers rotate queries and keys by, for the rope
types :mod:`pdserve.engine.model_config` accepts (default, linear, llama3). They are computed
with the same operations, in the same order and dtypes, as transformers 5's
``LlamaRotaryEmbedding`` (``compute_default_rope_parameters``) and ``modeling_rope_utils``
(``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``), so our tables
are bit-identical to the reference implementation rather than merely close: a one-ulp
difference in an angle at position 100k is a visible logit difference. Applying the
rotation is the consumer's job.
"""

from __future__ import annotations

import math

import torch

from .model_config import SUPPORTED_ROPE_TYPES, RopeConfig

__all__ = ["cos_sin_cache", "inv_freq"]


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """float32 inverse frequencies, shape ``[head_dim // 2]``, computed on the CPU.

    The expressions below are transformers' verbatim (including ``int / tensor`` forms,
    which torch evaluates as ``reciprocal(tensor) * int``); do not "simplify" them.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    base = rope.theta
    dim = head_dim  # partial_rotary_factor is always 1.0 here (model_config refuses others)

    if rope.rope_type == "default":
        # LlamaRotaryEmbedding.compute_default_rope_parameters uses a float arange directly.
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    # The scaled variants build the same exponents from an int64 arange cast to float.
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))

    if rope.rope_type == "linear":
        inv /= rope.factor
        return inv

    if rope.rope_type == "llama3":
        factor = rope.factor
        low_freq_factor = rope.low_freq_factor
        high_freq_factor = rope.high_freq_factor
        old_context_len = rope.original_max_position_embeddings
        if old_context_len is None:
            raise ValueError("llama3 rope needs original_max_position_embeddings")

        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor

        wavelen = 2 * math.pi / inv
        # wavelen < high_freq_wavelen: keep; wavelen > low_freq_wavelen: divide by factor.
        inv_llama = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
        # In between: interpolate with a smooth factor.
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth_factor) * inv_llama / factor + smooth_factor * inv_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_llama)

    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    raise ValueError(f"rope type {rope.rope_type!r} is not supported (supported: {supported})")


def cos_sin_cache(
    rope: RopeConfig,
    head_dim: int,
    max_positions: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos``, ``sin`` of shape ``[max_positions, head_dim // 2]``; row p is position p.

    Matches transformers' forward, ``position_ids[..., None].float() * inv_freq`` then
    ``cos``/``sin`` of ``cat(freqs, freqs)`` (whose halves are equal, so we keep one).
    transformers 5.17 writes the product as ``inv_freq[:, None] @ positions[None, :]``; with
    an inner dimension of 1 that matmul is a single rounded product, hence the same bits
    (checked against 5.17 on CUDA and 5.23 on CPU).
    The attention scaling of these rope types is 1.0, which transformers multiplies in
    exactly, so it is omitted.
    """
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    # Like transformers, inverse frequencies are computed on the CPU (its buffer is built at
    # init, before the model moves) and only the product and cos/sin run on `device`.
    inv = inv_freq(rope, head_dim).to(device=device, dtype=torch.float)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device)
    freqs = positions[:, None].float() * inv
    return freqs.cos(), freqs.sin()
