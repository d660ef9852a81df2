"""Tests for engine/rope.py: inverse frequencies and cos/sin tables are bit-identical
(torch.equal) to transformers 5's rotary embedding modules for every supported rope type."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from pdserve.engine.model_config import ModelConfig, RopeConfig
from pdserve.engine.rope import cos_sin_cache, inv_freq

_ROTARY = {"llama": LlamaRotaryEmbedding, "qwen2": Qwen2RotaryEmbedding,
           "mistral": MistralRotaryEmbedding}
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "mistral": "MistralForCausalLM"}


def _raw(head_dim: int, max_pos: int, family: str = "llama", **extra: Any) -> dict[str, Any]:
    return {"architectures": [_ARCH[family]], "model_type": family, "vocab_size": 100,
            "hidden_size": 4 * head_dim, "intermediate_size": 8 * head_dim,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max_pos, **extra}


def _llama3(factor: float, low: float, high: float, original: int) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}


CASES: dict[str, dict[str, Any]] = {
    **{f"default_hd{d}": _raw(d, 256) for d in (16, 32, 64)},
    "default_int_theta_qwen2": _raw(32, 300, "qwen2", rope_theta=1000000),
    "default_odd_theta_mistral": _raw(64, 300, "mistral", rope_theta=12345.678),
    "default_new_form": _raw(32, 256, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 500000.0}),
    **{f"linear_hd{d}": _raw(d, 256, rope_scaling={"type": "linear", "factor": 2.0})
       for d in (16, 32, 64)},
    "linear_int_factor_3": _raw(32, 256, rope_theta=50000,
                                rope_scaling={"rope_type": "linear", "factor": 3}),
    **{f"llama3_hd{d}": _raw(d, 256, rope_theta=500000.0, rope_scaling=_llama3(8.0, 1.0, 4.0, 64))
       for d in (16, 32, 64)},
    "llama3_new_form": _raw(32, 256, rope_parameters={**_llama3(8.0, 1.0, 4.0, 64),
                                                      "rope_theta": 500000.0}),
    "llama3_other_factors": _raw(64, 300, rope_theta=10000,
                                 rope_scaling=_llama3(16, 2, 8, 32)),
    "llama3_original_fallback": _raw(32, 256, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    # transformers' rotary init lets a top-level original_max_position_embeddings win.
    "llama3_top_level_original": _raw(32, 256, rope_theta=500000.0,
                                      original_max_position_embeddings=32, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    # Real sizes: Llama-3.1-8B and Llama-3.2-1B rope, a few thousand positions past 8192.
    "llama31_real": _raw(128, 10000, rope_theta=500000.0,
                         rope_scaling=_llama3(8.0, 1.0, 4.0, 8192)),
    "llama32_real": _raw(64, 10000, rope_theta=500000.0,
                         rope_scaling=_llama3(32.0, 1.0, 4.0, 8192)),
}


def _pair(raw: dict[str, Any]) -> tuple[ModelConfig, torch.nn.Module]:
    ours = ModelConfig.from_dict(raw)
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    tc = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return ours, _ROTARY[raw["model_type"]](tc)


def _reference(rotary: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = torch.zeros(1, dtype=torch.float32)  # forward reads only x's dtype and device
    with torch.no_grad():
        cos, sin = rotary(x, positions[None, :])
    half = cos.shape[-1] // 2
    # transformers returns cat(freqs, freqs): both halves are the same table.
    assert torch.equal(cos[..., :half], cos[..., half:])
    return cos[0, :, :half], sin[0, :, :half]


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_bit_identical(name: str) -> None:
    ours, rotary = _pair(CASES[name])
    mine = inv_freq(ours.rope, ours.head_dim)
    assert mine.dtype == torch.float32 and mine.shape == (ours.head_dim // 2,)
    assert torch.equal(mine, rotary.inv_freq)
    assert rotary.attention_scaling == 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_cache_bit_identical(name: str) -> None:
    ours, rotary = _pair(CASES[name])
    n = ours.max_position_embeddings
    cos, sin = cos_sin_cache(ours.rope, ours.head_dim, n)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (n, ours.head_dim // 2)
    ref_cos, ref_sin = _reference(rotary, torch.arange(n))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)

    # Rows gathered by position equal transformers' forward on just those positions
    # (how it runs at decode time), including positions past the original context.
    picked = torch.tensor([0, 1, 63, 64, 65, 200, n - 1, 37])
    ref_cos, ref_sin = _reference(rotary, picked)
    assert torch.equal(cos[picked], ref_cos) and torch.equal(sin[picked], ref_sin)


def test_scaling_changes_tables() -> None:
    """Guards against the bit-identity tests passing on a rope type silently ignored."""
    base = RopeConfig(rope_type="default", theta=500000.0)
    linear = RopeConfig(rope_type="linear", theta=500000.0, factor=2.0)
    llama3 = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0,
                        original_max_position_embeddings=64)
    ref = inv_freq(base, 32)
    assert torch.equal(inv_freq(linear, 32), ref / 2.0)
    scaled = inv_freq(llama3, 32)
    assert scaled[0] == ref[0]  # highest frequency untouched
    assert torch.equal(scaled[-1], ref[-1] / 8.0)  # lowest divided by the factor


def test_elementwise_product_equals_matmul_form() -> None:
    """Older transformers formed freqs as inv_freq[:, None] @ positions[None, :]; with an
    inner dimension of 1 that is one rounded product, so the tables are the same bits."""
    rope = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0,
                      original_max_position_embeddings=64)
    inv = inv_freq(rope, 64)
    pos = torch.arange(4099)
    matmul = (inv[None, :, None].float() @ pos[None, None, :].float()).transpose(1, 2)[0]
    cos, sin = cos_sin_cache(rope, 64, 4099)
    assert torch.equal(cos, matmul.cos()) and torch.equal(sin, matmul.sin())


def test_rejects_bad_arguments() -> None:
    rope = RopeConfig(rope_type="default", theta=10000.0)
    with pytest.raises(ValueError, match="head_dim"):
        inv_freq(rope, 15)
    with pytest.raises(ValueError, match="max_positions"):
        cos_sin_cache(rope, 16, 0)
    with pytest.raises(ValueError, match="not supported"):
        inv_freq(RopeConfig(rope_type="yarn", theta=10000.0), 16)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        inv_freq(RopeConfig(rope_type="llama3", theta=10000.0, factor=8.0), 16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["default_hd64", "llama31_real"])
def test_cos_sin_cache_on_cuda_matches_transformers_on_cuda(name: str) -> None:
    ours, rotary = _pair(CASES[name])
    rotary = rotary.to("cuda")
    n = ours.max_position_embeddings
    cos, sin = cos_sin_cache(ours.rope, ours.head_dim, n, device="cuda")
    assert cos.device.type == "cuda"
    x = torch.zeros(1, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        ref_cos, ref_sin = rotary(x, torch.arange(n, device="cuda")[None, :])
    half = ours.head_dim // 2
    assert torch.equal(cos, ref_cos[0, :, :half]) and torch.equal(sin, ref_sin[0, :, :half])
