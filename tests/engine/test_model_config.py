"""Tests for engine/model_config.py: hand-written config.json fixtures parse to the fields
transformers 5 derives from them, every refusal names its field, and the serving context
length is resolved as documented."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from typing import Any

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP

from pdserve.engine.model_config import (
    ModelConfig,
    ModelConfigError,
    RopeConfig,
    resolve_max_model_len,
)

# ---- fixtures: shaped after the published config.json of each model -----------------------

LLAMA2 = {  # Llama-2-7b-hf: old form, rope_scaling null, no head_dim, no rope_theta
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True,
    "vocab_size": 32000,
}
_LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA31_OLD = {  # Llama-3.1-8B-Instruct, pre-5 form
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": dict(_LLAMA3_SCALING), "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
LLAMA31_NEW = {k: v for k, v in LLAMA31_OLD.items()
               if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
LLAMA31_NEW |= {"rope_parameters": {**_LLAMA3_SCALING, "rope_theta": 500000.0},
                "dtype": "bfloat16", "head_dim": 128}
LLAMA32 = {  # Llama-3.2-1B: tied embeddings, head_dim given, base model eos as int
    **LLAMA31_OLD, "eos_token_id": 128001, "head_dim": 64, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "tie_word_embeddings": True,
    "rope_scaling": {**_LLAMA3_SCALING, "factor": 32.0},
}
LLAMA_LINEAR = {**LLAMA2, "max_position_embeddings": 16384,
                "rope_scaling": {"type": "linear", "factor": 4.0}}
QWEN25 = {  # Qwen2.5-0.5B-Instruct
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN2_SLIDING = {**QWEN25, "use_sliding_window": True, "sliding_window": 4096,
                 "max_window_layers": 20, "tie_word_embeddings": False}
QWEN2_SLIDING_NO_LAYER = {**QWEN2_SLIDING, "max_window_layers": 24}  # no layer index >= 24
QWEN2_LAYER_TYPES = {**QWEN2_SLIDING, "max_window_layers": 24,  # layer_types overrides it
                     "layer_types": ["full_attention"] * 23 + ["sliding_attention"]}
QWEN2_MINIMAL = {  # everything optional left to transformers' Qwen2Config defaults
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 4, "vocab_size": 1000,
}
# Both forms at once: a non-empty rope_scaling wins, and takes the top-level rope_theta.
LLAMA_BOTH_FORMS = {**LLAMA31_NEW, "rope_theta": 123.0,
                    "rope_scaling": {"type": "linear", "factor": 4.0}}
MISTRAL = {  # Mistral-7B-v0.1
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}
MISTRAL_NULL = {**MISTRAL, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768}
MISTRAL_MINIMAL = {k: v for k, v in MISTRAL.items()  # defaults: 8 kv heads, window 4096
                   if k not in ("num_key_value_heads", "sliding_window", "rope_theta",
                                "bos_token_id", "eos_token_id", "torch_dtype", "rms_norm_eps")}

FIXTURES: dict[str, dict[str, Any]] = {
    "llama2": LLAMA2, "llama31_old": LLAMA31_OLD, "llama31_new": LLAMA31_NEW,
    "llama32": LLAMA32, "llama_linear": LLAMA_LINEAR, "llama_both_forms": LLAMA_BOTH_FORMS,
    "qwen25": QWEN25,
    "qwen2_sliding": QWEN2_SLIDING, "qwen2_sliding_no_layer": QWEN2_SLIDING_NO_LAYER,
    "qwen2_layer_types": QWEN2_LAYER_TYPES, "qwen2_minimal": QWEN2_MINIMAL,
    "mistral": MISTRAL, "mistral_null": MISTRAL_NULL, "mistral_minimal": MISTRAL_MINIMAL,
}


def parse(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(copy.deepcopy(raw))


# ---- parsed fields -------------------------------------------------------------------------

def test_llama2() -> None:
    c = parse(LLAMA2)
    assert (c.architecture, c.model_type, c.vocab_size, c.hidden_size) == (
        "LlamaForCausalLM", "llama", 32000, 4096)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 32, 128)
    assert c.rope == RopeConfig(rope_type="default", theta=10000.0)
    assert (c.rms_norm_eps, c.max_position_embeddings, c.dtype) == (1e-5, 4096, "float16")
    assert (c.qkv_bias, c.o_bias, c.tie_word_embeddings, c.sliding_window) == (
        False, False, False, None)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))


def test_llama31_old_and_new_forms_agree() -> None:
    old, new = parse(LLAMA31_OLD), parse(LLAMA31_NEW)
    expected = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert old.rope == new.rope == expected
    assert (old.dtype, new.dtype) == ("bfloat16", "bfloat16")
    assert old.eos_token_ids == new.eos_token_ids == (128001, 128008, 128009)
    assert (old.num_key_value_heads, old.head_dim, new.head_dim) == (8, 128, 128)
    assert old.config_hash != new.config_hash  # hashes the raw dict, not the parse


def test_llama32_tied_head_dim() -> None:
    c = parse(LLAMA32)
    assert (c.tie_word_embeddings, c.head_dim, c.hidden_size) == (True, 64, 2048)
    assert (c.rope.factor, c.rope.original_max_position_embeddings) == (32.0, 8192)
    assert c.eos_token_ids == (128001,)


def test_linear_rope_via_legacy_type_key() -> None:
    assert parse(LLAMA_LINEAR).rope == RopeConfig(rope_type="linear", theta=10000.0, factor=4.0)


def test_rope_scaling_wins_over_rope_parameters() -> None:
    assert parse(LLAMA_BOTH_FORMS).rope == RopeConfig(rope_type="linear", theta=123.0, factor=4.0)
    empty_legacy = {**LLAMA31_NEW, "rope_scaling": {}, "rope_theta": 123.0}
    assert parse(empty_legacy).rope == parse(LLAMA31_NEW).rope


def test_qwen25() -> None:
    c = parse(QWEN25)
    assert (c.qkv_bias, c.o_bias, c.tie_word_embeddings) == (True, False, True)
    assert (c.head_dim, c.num_key_value_heads, c.sliding_window) == (64, 2, None)
    assert c.rope == RopeConfig(rope_type="default", theta=1000000.0)
    assert (c.bos_token_id, c.eos_token_ids, c.rms_norm_eps) == (151643, (151645,), 1e-6)


@pytest.mark.parametrize(("raw", "window"), [
    (QWEN2_SLIDING, 4096), (QWEN2_SLIDING_NO_LAYER, None), (QWEN2_LAYER_TYPES, 4096),
    ({**QWEN2_SLIDING, "sliding_window": None}, None), (QWEN2_MINIMAL, None),
    ({**QWEN2_MINIMAL, "use_sliding_window": True, "max_window_layers": 2}, 4096),
])
def test_qwen2_sliding_window(raw: dict[str, Any], window: int | None) -> None:
    assert parse(raw).sliding_window == window


def test_mistral_and_family_defaults() -> None:
    assert parse(MISTRAL).sliding_window == 4096
    assert parse(MISTRAL_NULL).sliding_window is None
    m = parse(MISTRAL_MINIMAL)
    assert (m.num_key_value_heads, m.sliding_window, m.rope.theta) == (8, 4096, 10000.0)
    assert (m.bos_token_id, m.eos_token_ids, m.dtype, m.rms_norm_eps) == (1, (2,), "float32", 1e-6)
    q = parse(QWEN2_MINIMAL)
    assert (q.num_key_value_heads, q.bos_token_id, q.eos_token_ids) == (32, None, ())
    assert parse({**QWEN2_MINIMAL, "num_key_value_heads": None}).num_key_value_heads == 32


@pytest.mark.parametrize(("extra", "dtype"), [
    ({"torch_dtype": "float16"}, "float16"), ({"dtype": "bfloat16"}, "bfloat16"),
    ({"dtype": "float16", "torch_dtype": "bfloat16"}, "float16"),
    ({"dtype": None, "torch_dtype": "bfloat16"}, "bfloat16"), ({}, "float32"),
])
def test_dtype_sources(extra: dict[str, Any], dtype: str) -> None:
    base = {k: v for k, v in LLAMA2.items() if k != "torch_dtype"}
    assert parse({**base, **extra}).dtype == dtype


@pytest.mark.parametrize(("eos", "expected"), [(2, (2,)), ([5, 6], (5, 6)), (None, ())])
def test_eos_forms(eos: Any, expected: tuple[int, ...]) -> None:
    assert parse({**LLAMA2, "eos_token_id": eos}).eos_token_ids == expected


def test_config_hash_is_canonical_json_sha256() -> None:
    c = parse(LLAMA2)
    canonical = json.dumps(LLAMA2, sort_keys=True, separators=(",", ":"))
    assert c.config_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert parse(dict(reversed(list(LLAMA2.items())))).config_hash == c.config_hash
    assert parse({**LLAMA2, "rms_norm_eps": 1e-6}).config_hash != c.config_hash


# ---- agreement with transformers' own standardization --------------------------------------

_MODULES = {"llama": (LlamaAttention, LlamaMLP), "qwen2": (Qwen2Attention, Qwen2MLP),
            "mistral": (MistralAttention, MistralMLP)}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_agrees_with_transformers(name: str) -> None:
    raw = FIXTURES[name]
    ours = parse(raw)
    kwargs = copy.deepcopy(raw)
    tc = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)

    rp = tc.rope_parameters
    assert rp["rope_type"] == ours.rope.rope_type
    assert rp["rope_theta"] == ours.rope.theta
    if ours.rope.rope_type != "default":
        assert rp["factor"] == ours.rope.factor
    if ours.rope.rope_type == "llama3":
        assert (rp["low_freq_factor"], rp["high_freq_factor"]) == (
            ours.rope.low_freq_factor, ours.rope.high_freq_factor)
        assert rp["original_max_position_embeddings"] == ours.rope.original_max_position_embeddings
    assert tc.num_key_value_heads == ours.num_key_value_heads
    assert tc.tie_word_embeddings == ours.tie_word_embeddings
    assert (tc.vocab_size, tc.hidden_size, tc.intermediate_size) == (
        ours.vocab_size, ours.hidden_size, ours.intermediate_size)
    assert (tc.max_position_embeddings, tc.rms_norm_eps) == (
        ours.max_position_embeddings, ours.rms_norm_eps)
    assert str(tc.dtype or torch.float32).removeprefix("torch.") == ours.dtype
    eos = tc.eos_token_id
    assert tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]) == (
        ours.eos_token_ids)
    assert tc.bos_token_id == ours.bos_token_id

    # Shapes, biases and windows as transformers' modules build them (on meta: no memory).
    attn_cls, mlp_cls = _MODULES[ours.model_type]
    with torch.device("meta"):
        layers = [attn_cls(tc, layer_idx=i) for i in range(tc.num_hidden_layers)]
        mlp = mlp_cls(tc)
    attn = layers[0]
    assert attn.head_dim == ours.head_dim
    assert attn.k_proj.out_features == ours.num_key_value_heads * ours.head_dim
    assert (attn.q_proj.bias is not None, attn.k_proj.bias is not None) == (
        ours.qkv_bias, ours.qkv_bias)
    assert (attn.o_proj.bias is not None) == ours.o_bias
    assert mlp.gate_proj.bias is None and mlp.down_proj.bias is None
    if ours.model_type == "qwen2":
        windows = {layer.sliding_window for layer in layers} - {None}
        assert windows == ({ours.sliding_window} if ours.sliding_window else set())
    elif ours.model_type == "mistral":
        assert tc.sliding_window == ours.sliding_window


# ---- refusals name their field --------------------------------------------------------------

def _drop(raw: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != key}


_NEW_ROPE = LLAMA31_NEW["rope_parameters"]
REFUSALS: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    ("arch_missing", _drop(LLAMA2, "architectures"), "architectures", ("LlamaForCausalLM",)),
    ("arch_unknown", {**LLAMA2, "architectures": ["GPT2LMHeadModel"]}, "architectures",
     ("'GPT2LMHeadModel'", "Qwen2ForCausalLM", "MistralForCausalLM")),
    ("arch_two", {**LLAMA2, "architectures": ["LlamaForCausalLM", "X"]}, "architectures", ()),
    ("arch_str", {**LLAMA2, "architectures": "LlamaForCausalLM"}, "architectures", ()),
    ("hidden_act", {**LLAMA2, "hidden_act": "gelu"}, "hidden_act", ("'gelu'", "silu")),
    ("yarn_old", {**LLAMA2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 4096}},
     "rope_scaling.rope_type", ("'yarn'", "default, linear, llama3")),
    ("dynamic_type_key", {**LLAMA2, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.type", ("'dynamic'",)),
    ("longrope_new", {**LLAMA31_NEW, "rope_parameters": {**_NEW_ROPE, "rope_type": "longrope"}},
     "rope_parameters.rope_type", ("'longrope'",)),
    ("partial_top", {**LLAMA2, "partial_rotary_factor": 0.5}, "partial_rotary_factor", ("0.5",)),
    ("partial_inner", {**LLAMA31_NEW, "rope_parameters": {**_NEW_ROPE,
                                                          "partial_rotary_factor": 0.25}},
     "rope_parameters.partial_rotary_factor", ("0.25",)),
    ("quantized", {**LLAMA2, "quantization_config": {"quant_method": "awq", "bits": 4}},
     "quantization_config", ()),
    ("mlp_bias", {**LLAMA31_OLD, "mlp_bias": True}, "mlp_bias", ()),
    *[(f"missing_{k}", _drop(LLAMA2, k), k, ("missing",)) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings")],
    ("kv_not_divisor", {**LLAMA2, "num_key_value_heads": 6}, "num_key_value_heads",
     ("num_attention_heads",)),
    ("hidden_zero", {**LLAMA2, "hidden_size": 0}, "hidden_size", (">= 1",)),
    ("layers_negative", {**LLAMA2, "num_hidden_layers": -2}, "num_hidden_layers", ()),
    ("vocab_string", {**LLAMA2, "vocab_size": "32000"}, "vocab_size", ("integer",)),
    ("heads_bool", {**LLAMA2, "num_attention_heads": True}, "num_attention_heads", ()),
    ("max_pos_zero", {**LLAMA2, "max_position_embeddings": 0}, "max_position_embeddings", ()),
    ("eps_zero", {**LLAMA2, "rms_norm_eps": 0}, "rms_norm_eps", ()),
    ("dtype_unknown", {**LLAMA31_NEW, "dtype": "float8_e4m3fn"}, "dtype",
     ("'float8_e4m3fn'", "bfloat16")),
    ("torch_dtype_unknown", {**LLAMA2, "torch_dtype": "int8"}, "torch_dtype", ("'int8'",)),
    ("head_dim_odd", {**LLAMA2, "head_dim": 127}, "head_dim", ("even",)),
    ("hidden_not_divisible", {**LLAMA2, "num_attention_heads": 30, "num_key_value_heads": 30},
     "hidden_size", ("num_attention_heads",)),
    ("linear_no_factor", {**LLAMA2, "rope_scaling": {"type": "linear"}},
     "rope_scaling.factor", ("missing",)),
    ("llama3_no_low", {**LLAMA31_OLD, "rope_scaling": _drop(_LLAMA3_SCALING, "low_freq_factor")},
     "rope_scaling.low_freq_factor", ("missing",)),
    ("llama3_high_le_low", {**LLAMA31_OLD, "rope_scaling": {**_LLAMA3_SCALING,
                                                            "high_freq_factor": 1.0}},
     "rope_scaling.high_freq_factor", ("low_freq_factor",)),
    ("original_conflict", {**LLAMA31_OLD, "original_max_position_embeddings": 4096},
     "original_max_position_embeddings", ("8192", "4096")),
    ("theta_negative", {**LLAMA2, "rope_theta": -1.0}, "rope_theta", ()),
    ("theta_null_inner", {**LLAMA31_NEW, "rope_parameters": {**_NEW_ROPE, "rope_theta": None}},
     "rope_parameters.rope_theta", ()),
    ("rope_not_object", {**LLAMA2, "rope_scaling": "llama3"}, "rope_scaling", ()),
    ("rope_per_layer", {**LLAMA2, "rope_parameters": {"full_attention": {"rope_type": "default"}}},
     "rope_parameters", ("per-layer",)),
    ("qwen_layer_types", {**QWEN2_SLIDING, "layer_types": ["chunked_attention"] * 24},
     "layer_types", ()),
    ("qwen_layer_types_len", {**QWEN2_SLIDING, "layer_types": ["full_attention"]},
     "layer_types", ("24",)),
    ("use_sliding_not_bool", {**QWEN25, "use_sliding_window": "no"}, "use_sliding_window", ()),
    ("sliding_zero", {**MISTRAL, "sliding_window": 0}, "sliding_window", ()),
    ("eos_string", {**LLAMA2, "eos_token_id": "</s>"}, "eos_token_id", ()),
    ("tie_not_bool", {**LLAMA2, "tie_word_embeddings": 1}, "tie_word_embeddings", ()),
]


@pytest.mark.parametrize(("raw", "field", "needles"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusal_names_field(raw: dict[str, Any], field: str, needles: tuple[str, ...]) -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig.from_dict(raw, source="ckpt/config.json")
    message = str(info.value)
    assert info.value.field == field
    assert message.startswith(f"ckpt/config.json: {field} "), message
    for needle in needles:
        assert needle in message, message


def test_refusal_message_example_and_pickling() -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig.from_dict({**LLAMA2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert str(info.value) == ("config.json: rope_scaling.rope_type 'yarn' is not supported "
                               "(supported: default, linear, llama3)")
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.field, str(again)) == (info.value.field, str(info.value))
    assert isinstance(again, ValueError)


def test_not_a_mapping() -> None:
    with pytest.raises(ModelConfigError, match="expected a JSON object"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_ignores_model_type_mismatch_and_llama_sliding_window() -> None:
    c = parse({**LLAMA2, "model_type": "llama-custom", "sliding_window": 128})
    assert (c.architecture, c.model_type, c.sliding_window) == (
        "LlamaForCausalLM", "llama-custom", None)


# ---- from_pretrained ------------------------------------------------------------------------

def test_from_pretrained(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN25, indent=2))
    c = ModelConfig.from_pretrained(tmp_path)
    assert c == parse(QWEN25)
    assert ModelConfig.from_pretrained(str(tmp_path)) == c


def test_from_pretrained_errors(tmp_path: Any) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelConfigError, match="does not exist") as info:
        ModelConfig.from_pretrained(missing)
    assert str(missing) in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelConfigError, match="not a directory"):
        ModelConfig.from_pretrained(tmp_path / "file")
    with pytest.raises(ModelConfigError, match="config.json not found") as info:
        ModelConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    (tmp_path / "config.json").write_text('{"architectures": [')
    with pytest.raises(ModelConfigError, match="invalid JSON") as info:
        ModelConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2, "hidden_act": "relu"}))
    with pytest.raises(ModelConfigError) as info:
        ModelConfig.from_pretrained(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: hidden_act ")


# ---- resolve_max_model_len ------------------------------------------------------------------

def test_resolve_max_model_len_full_attention() -> None:
    c = parse(LLAMA31_OLD)
    assert resolve_max_model_len(c, None) == (131072, None)
    assert resolve_max_model_len(c, 8192) == (8192, None)
    assert resolve_max_model_len(c, 131072) == (131072, None)
    with pytest.raises(ModelConfigError) as info:
        resolve_max_model_len(c, 131073)
    assert info.value.field == "max_model_len"
    assert "max_model_len" in str(info.value) and "max_position_embeddings" in str(info.value)
    for bad in (0, -4):
        with pytest.raises(ModelConfigError, match="max_model_len"):
            resolve_max_model_len(c, bad)
    assert resolve_max_model_len(parse(QWEN25), None) == (32768, None)  # window inactive


def test_resolve_max_model_len_sliding_window() -> None:
    c = parse(MISTRAL)  # window 4096 < 32768 positions
    length, note = resolve_max_model_len(c, None)
    assert length == 4096 and note is not None and "sliding_window" in note
    assert resolve_max_model_len(c, 4096) == (4096, None)
    with pytest.raises(ModelConfigError) as info:
        resolve_max_model_len(c, 4097)
    assert info.value.field == "sliding_window" and "sliding_window" in str(info.value)
    assert resolve_max_model_len(parse(QWEN2_SLIDING), None)[0] == 4096
    wide = parse({**MISTRAL, "sliding_window": 65536})  # window wider than the context
    assert resolve_max_model_len(wide, None) == (32768, None)
