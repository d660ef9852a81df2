"""Model configuration: parse a Hugging Face ``config.json`` into the typed, frozen
:class:`ModelConfig` the engine builds its model, KV cache and rotary tables from.

This module owns the interpretation of checkpoint configs for the supported decoder
families (Llama 2/3/3.1/3.2, Qwen2/2.5, Mistral) in both the transformers-5 form
(``rope_parameters``) and the older form (top-level ``rope_theta`` + ``rope_scaling``),
and the refusal, with an error naming the offending field, of anything the engine cannot
run faithfully. Defaults mirror transformers 5's config classes (``LlamaConfig``,
``Qwen2Config``, ``MistralConfig`` and ``RotaryEmbeddingConfigMixin``) so that the shapes
we derive are the shapes transformers saved the weights with. It also owns
:func:`resolve_max_model_len`, the choice of the serving context length.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.common import UserError
from pdserve.common.compat import config_hash

__all__ = ["ModelConfig", "ModelConfigError", "RopeConfig", "SUPPORTED_ARCHITECTURES",
           "SUPPORTED_DTYPES", "SUPPORTED_ROPE_TYPES", "resolve_max_model_len"]

SUPPORTED_ARCHITECTURES: dict[str, str] = {  # architecture -> family
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

# transformers' RotaryEmbeddingConfigMixin.default_theta.
_DEFAULT_ROPE_THETA = 10_000.0
_MISSING: Any = object()


class ModelConfigError(UserError, ValueError):
    """A config the engine refuses; ``field`` names the offending config field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (workers report them to the proxy): keep both args.
        return (type(self), (self.field, str(self)))


@dataclass(frozen=True)
class RopeConfig:
    """Rotary parameters after transformers' standardization; see engine/rope.py."""

    rope_type: str  # "default" | "linear" | "llama3"
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class _FamilyDefaults:
    """What transformers' config class assumes when a key is absent from config.json."""

    num_key_value_heads: int | None  # None: same as num_attention_heads
    bos_token_id: int | None
    eos_token_id: int | None
    sliding_window: int | None


# From the dataclass field defaults of LlamaConfig, Qwen2Config and MistralConfig
# (transformers 5). Note Qwen2 and Mistral default num_key_value_heads to a constant
# (32, 8), not to num_attention_heads; only an explicit null means "same as heads".
_FAMILY_DEFAULTS: dict[str, _FamilyDefaults] = {  # kv heads, bos, eos, sliding window
    "llama": _FamilyDefaults(None, 1, 2, None),
    "qwen2": _FamilyDefaults(32, None, None, 4096),
    "mistral": _FamilyDefaults(8, 1, 2, 4096),
}
_QWEN2_MAX_WINDOW_LAYERS = 28
# "attention" is the legacy spelling transformers remaps to "full_attention".
_QWEN2_LAYER_TYPES = ("full_attention", "sliding_attention", "attention")


class _Fields:
    """Typed access to the raw dict; every failure names the field and the source."""

    def __init__(self, raw: Mapping[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def error(self, field: str, problem: str) -> ModelConfigError:
        return ModelConfigError(field, f"{self.source}: {field} {problem}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.raw:
            return self.raw[key]
        if default is _MISSING:
            raise self.error(key, "is required but missing")
        return default

    def int_(self, field: str, value: Any, *, minimum: int = 1) -> int:
        # bool is an int subclass; JSON true is never a size.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(field, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.error(field, f"must be >= {minimum}, got {value}")
        return value

    def number(self, field: str, value: Any, *, positive: bool = True) -> float:
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not math.isfinite(value)):
            raise self.error(field, f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.error(field, f"must be > 0, got {value}")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value


def _parse_architecture(f: _Fields) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    archs = f.raw.get("architectures")
    if archs is None:
        raise f.error("architectures", f"is missing (supported: {supported})")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise f.error("architectures", f"must be a list of one name, got {archs!r} "
                                       f"(supported: {supported})")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise f.error("architectures", f"{archs[0]!r} is not supported (supported: {supported})")
    return archs[0]


def _parse_rope(f: _Fields, max_position_embeddings: int) -> RopeConfig:
    """Mirror RotaryEmbeddingConfigMixin.convert_rope_params_to_dict + standardize_rope_params."""
    raw = f.raw
    # transformers: `rope_parameters = rope_scaling or rope_parameters`, so a non-empty
    # legacy dict wins over the new one; null / {} fall through.
    if raw.get("rope_scaling"):
        name, params = "rope_scaling", raw["rope_scaling"]
    else:
        name, params = "rope_parameters", raw.get("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise f.error(name, f"must be an object or null, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise f.error(name, "per-layer-type rope parameters are not supported")

    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise f.error(f"{name}.{type_key}", f"{rope_type!r} is not supported "
                                            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    # The in-dict value wins over the top-level one (transformers uses setdefault).
    if "partial_rotary_factor" in params:
        prf_field, prf = f"{name}.partial_rotary_factor", params["partial_rotary_factor"]
    else:
        prf_field, prf = "partial_rotary_factor", raw.get("partial_rotary_factor")
    if prf is not None and prf != 1:
        raise f.error(prf_field, f"{prf!r} is not supported (only full rotary, 1.0)")

    if "rope_theta" in params:
        theta_field, theta = f"{name}.rope_theta", params["rope_theta"]
    else:
        theta_field, theta = "rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA)
    theta = f.number(theta_field, theta)

    if rope_type == "default":
        return RopeConfig(rope_type="default", theta=theta)

    def required(key: str) -> float:
        if params.get(key) is None:
            raise f.error(f"{name}.{key}", f"is required for rope type {rope_type!r} but missing")
        return f.number(f"{name}.{key}", params[key])

    factor = required("factor")
    if rope_type == "linear":
        return RopeConfig(rope_type="linear", theta=theta, factor=factor)

    low, high = required("low_freq_factor"), required("high_freq_factor")
    if high <= low:
        raise f.error(f"{name}.high_freq_factor",
                      f"({high}) must be greater than low_freq_factor ({low})")
    # Fallback order as transformers computes it at rotary init: a top-level
    # original_max_position_embeddings attribute overrides the dict's value (its Phi3
    # special case), else the dict's, else max_position_embeddings. A conflict between the
    # two is ambiguous (transformers' config and its model would disagree), so refuse it.
    inner = params.get("original_max_position_embeddings")
    outer = raw.get("original_max_position_embeddings")
    if inner is not None and outer is not None and inner != outer:
        raise f.error("original_max_position_embeddings",
                      f"({outer}) disagrees with {name}.original_max_position_embeddings ({inner})")
    if outer is not None:
        original = f.int_("original_max_position_embeddings", outer)
    elif inner is not None:
        original = f.int_(f"{name}.original_max_position_embeddings", inner)
    else:
        original = max_position_embeddings
    return RopeConfig(rope_type="llama3", theta=theta, factor=factor, low_freq_factor=low,
                      high_freq_factor=high, original_max_position_embeddings=original)


def _parse_sliding_window(f: _Fields, family: str, num_hidden_layers: int) -> int | None:
    """The window the checkpoint's attention actually uses, or None if no layer slides."""
    if family == "llama":
        return None  # LlamaAttention has no sliding window, whatever the config says.
    window = f.get("sliding_window", _FAMILY_DEFAULTS[family].sliding_window)
    if window is not None:
        window = f.int_("sliding_window", window)
    if family == "mistral":
        return window  # MistralModel applies it to every layer when not null.

    # Qwen2Config.__post_init__: the window only exists with use_sliding_window, and
    # then only layers typed "sliding_attention" (default: index >= max_window_layers) use it.
    use = f.bool_("use_sliding_window", False)
    layer_types = f.raw.get("layer_types")
    if layer_types is not None:
        if (not isinstance(layer_types, list) or len(layer_types) != num_hidden_layers
                or any(t not in _QWEN2_LAYER_TYPES for t in layer_types)):
            raise f.error("layer_types", f"must list one of {_QWEN2_LAYER_TYPES[:2]} for each of "
                                         f"the {num_hidden_layers} layers, got {layer_types!r}")
    if not use or window is None:
        return None
    if layer_types is None:
        max_window_layers = f.int_("max_window_layers",
                                   f.get("max_window_layers", _QWEN2_MAX_WINDOW_LAYERS), minimum=0)
        return window if num_hidden_layers > max_window_layers else None
    return window if "sliding_attention" in layer_types else None


def _parse_dtype(f: _Fields) -> str:
    # PreTrainedConfig keeps `dtype` when both are given; `torch_dtype` is the pre-5 name.
    field = "dtype" if f.raw.get("dtype") is not None else "torch_dtype"
    value = f.raw.get(field)
    if value is None:
        return "float32"
    if value not in SUPPORTED_DTYPES:
        raise f.error(field, f"{value!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_DTYPES)})")
    return value


def _parse_token_ids(f: _Fields, family: str) -> tuple[int | None, tuple[int, ...]]:
    defaults = _FAMILY_DEFAULTS[family]
    bos = f.get("bos_token_id", defaults.bos_token_id)
    if bos is not None:
        bos = f.int_("bos_token_id", bos, minimum=0)
    eos = f.get("eos_token_id", defaults.eos_token_id)
    if eos is None:
        return bos, ()
    items = eos if isinstance(eos, list) else [eos]
    return bos, tuple(f.int_("eos_token_id", e, minimum=0) for e in items)


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs from config.json, validated. Build with from_dict/from_pretrained."""

    architecture: str  # "LlamaForCausalLM" | "Qwen2ForCausalLM" | "MistralForCausalLM"
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None  # effective window; None when no layer slides
    dtype: str  # "float32" | "float16" | "bfloat16"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    config_hash: str  # sha256 of the canonical JSON of the raw dict

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, Mapping):
            raise ModelConfigError("config.json",
                                   f"{source}: expected a JSON object, got {type(raw).__name__}")
        try:
            digest = config_hash(raw)
        except (TypeError, ValueError) as e:
            raise ModelConfigError("config.json", f"{source}: not JSON-serializable: {e}") from e
        f = _Fields(raw, source)

        architecture = _parse_architecture(f)
        family = SUPPORTED_ARCHITECTURES[architecture]
        model_type = f.get("model_type", family)
        if not isinstance(model_type, str):
            raise f.error("model_type", f"must be a string, got {model_type!r}")

        if raw.get("quantization_config") is not None:
            raise f.error("quantization_config",
                          "is present: quantized checkpoints are not supported")
        hidden_act = f.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise f.error("hidden_act", f"{hidden_act!r} is not supported (supported: silu)")
        # Only LlamaMLP reads mlp_bias, but a config claiming MLP biases we would not load is
        # refused for every family rather than silently misread.
        if f.bool_("mlp_bias", False):
            raise f.error("mlp_bias", "true is not supported (MLP projections without bias only)")

        # transformers defaults these to 7B-sized values; a config that omits them is broken,
        # not a 7B model, so they are required here.
        sizes = {k: f.int_(k, f.get(k)) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings")}
        heads = sizes["num_attention_heads"]

        kv_heads = f.get("num_key_value_heads", _FAMILY_DEFAULTS[family].num_key_value_heads)
        kv_heads = heads if kv_heads is None else f.int_("num_key_value_heads", kv_heads)
        if heads % kv_heads != 0:
            raise f.error("num_key_value_heads",
                          f"({kv_heads}) must divide num_attention_heads ({heads})")

        head_dim = raw.get("head_dim")
        if head_dim is None:  # absent or null: derived, as every family's attention does
            if sizes["hidden_size"] % heads != 0:
                raise f.error("hidden_size",
                              f"({sizes['hidden_size']}) must be divisible by num_attention_heads "
                              f"({heads}) when head_dim is absent")
            head_dim = sizes["hidden_size"] // heads
        head_dim = f.int_("head_dim", head_dim)
        if head_dim % 2:
            raise f.error("head_dim", f"({head_dim}) must be even for rotary embeddings")

        if family == "llama":
            attention_bias = f.bool_("attention_bias", False)
            qkv_bias, o_bias = attention_bias, attention_bias
        elif family == "qwen2":
            qkv_bias, o_bias = True, False  # Qwen2Attention hard-codes these.
        else:
            qkv_bias, o_bias = False, False

        bos, eos = _parse_token_ids(f, family)
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=sizes["vocab_size"],
            hidden_size=sizes["hidden_size"],
            intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.number("rms_norm_eps", f.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(f, sizes["max_position_embeddings"]),
            max_position_embeddings=sizes["max_position_embeddings"],
            tie_word_embeddings=f.bool_("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=_parse_sliding_window(f, family, sizes["num_hidden_layers"]),
            dtype=_parse_dtype(f),
            bos_token_id=bos,
            eos_token_ids=eos,
            config_hash=digest,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read ``path/config.json`` from a local checkpoint directory (never the hub)."""
        directory = Path(path)
        if not directory.exists():
            raise ModelConfigError("path", f"{directory}: model directory does not exist")
        if not directory.is_dir():
            raise ModelConfigError("path", f"{directory}: is not a directory (expected a "
                                           f"checkpoint directory containing config.json)")
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ModelConfigError("config.json", f"{config_path}: config.json not found")
        try:
            text = config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelConfigError("config.json", f"{config_path}: cannot be read: {e}") from e
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelConfigError("config.json", f"{config_path}: invalid JSON: {e}") from e
        return cls.from_dict(raw, source=str(config_path))

    def tensor_parallel_problem(self, size: int) -> str | None:
        """Why this model cannot be split over `size` tensor-parallel ranks, or None. Each
        rank holds whole attention and KV heads (its own KV pool) and an equal slice of the
        MLP; the vocabulary is padded to a multiple of `size`, so it never refuses."""
        if size == 1:
            return None
        for name, value in (("num_key_value_heads", self.num_key_value_heads),
                            ("num_attention_heads", self.num_attention_heads),
                            ("intermediate_size", self.intermediate_size)):
            if value % size:
                return (f"tensor_parallel_size {size} does not divide the model's {name} "
                        f"({value}): every rank must hold the same number of whole "
                        f"{'heads' if 'heads' in name else 'MLP columns'}; pick a size that "
                        f"divides {value}")
        return None


def resolve_max_model_len(cfg: ModelConfig, requested: int | None) -> tuple[int, str | None]:
    """Pick the serving context length; return it and a note when it was capped.

    We never extend past ``max_position_embeddings`` (rope scaling in the config already
    describes the trained context), and we have no sliding-window attention, so a model
    whose layers slide is served only up to its window, where full attention is exact.
    """
    window = cfg.sliding_window
    if requested is None:
        limit = cfg.max_position_embeddings
        if window is not None and window < limit:
            return window, (f"max_model_len capped to sliding_window={window} (from "
                            f"max_position_embeddings={limit}): sliding-window attention is "
                            f"not implemented, full attention is exact only up to the window")
        return limit, None
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise ModelConfigError("max_model_len", f"max_model_len must be a positive integer, "
                                                f"got {requested!r}")
    if requested > cfg.max_position_embeddings:
        raise ModelConfigError("max_model_len", f"max_model_len={requested} exceeds the model's "
                                                f"max_position_embeddings="
                                                f"{cfg.max_position_embeddings}")
    if window is not None and requested > window:
        raise ModelConfigError("sliding_window", f"max_model_len={requested} exceeds the model's "
                                                 f"sliding_window={window} and sliding-window "
                                                 f"attention is not implemented")
    return requested, None
