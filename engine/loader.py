"""Weight loading: local safetensors checkpoints (single file or sharded) and `dummy` weights.

Hugging Face names map onto our fused parameters: q/k/v_proj stack into qkv_proj and
gate/up_proj into gate_up_proj, each checkpoint tensor copied into its slice. Every
parameter must be filled exactly once and every checkpoint tensor must have a home; anything
else is an error naming the tensor, because a silently half-loaded model still generates
plausible-looking text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pdserve.common import UserError
from pdserve.engine.model import CausalLM

LOAD_FORMATS = ("auto", "safetensors", "dummy")

# tensors some checkpoints carry that the model recomputes
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(UserError, RuntimeError):
    """The checkpoint is missing, unreadable, or does not fit the model; names the file/tensor."""


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a local checkpoint directory, in shard order."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"model path {str(root)!r} does not exist (models are read from "
                              "local directories only; there is no hub download)")
    if not root.is_dir():
        raise CheckpointError(f"model path {str(root)!r} is not a directory")
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise CheckpointError(
            f"no *.safetensors files in {str(root)!r} (found: {', '.join(found) or 'nothing'}); "
            "PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True"
        )
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, sf.get_tensor(name), f
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e


def _target(model: CausalLM, name: str) -> tuple[torch.Tensor, int, int] | None:
    """The parameter and row slice [start, end) a checkpoint tensor lands in, or None."""
    cfg = model.config
    if name.startswith("model."):
        name = name[len("model."):]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        if name == "embed_tokens.weight":
            return model.embed_tokens.weight, 0, cfg.vocab_size
        if name == "norm.weight":
            return model.norm.weight, 0, cfg.hidden_size
        if name == "lm_head.weight":
            return model.lm_head.weight, 0, cfg.vocab_size
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_hidden_layers:
        return None
    layer = model.layers[i]
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.intermediate_size
    attn = layer.self_attn
    fused = {
        "self_attn.q_proj": (attn.qkv_proj, 0, q),
        "self_attn.k_proj": (attn.qkv_proj, q, q + kv),
        "self_attn.v_proj": (attn.qkv_proj, q + kv, q + 2 * kv),
        "mlp.gate_proj": (layer.mlp.gate_up_proj, 0, inter),
        "mlp.up_proj": (layer.mlp.gate_up_proj, inter, 2 * inter),
        "self_attn.o_proj": (attn.o_proj, 0, cfg.hidden_size),
        "mlp.down_proj": (layer.mlp.down_proj, 0, cfg.hidden_size),
    }
    module, _, kind = rest.rpartition(".")
    if module in fused and kind in ("weight", "bias"):
        lin, start, end = fused[module]
        param = getattr(lin, kind)
        return (param, start, end) if param is not None else None
    if module in ("input_layernorm", "post_attention_layernorm") and kind == "weight":
        return getattr(layer, module).weight, 0, cfg.hidden_size
    return None


def load_safetensors(model: CausalLM, path: str | os.PathLike, progress: bool = True) -> None:
    """Copy every checkpoint tensor into its parameter slice (with dtype cast and device move)."""
    files = checkpoint_files(path)
    cfg = model.config
    filled: dict[tuple[int, int, int], str] = {}  # (param id, start, end) -> tensor name
    expected = _expected_slices(model)
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc="Loading weights", disable=not progress, leave=False)
    with torch.no_grad():
        for name, tensor, f in _iter_tensors(files):
            bar.update(tensor.numel() * tensor.element_size())
            if _IGNORED.fullmatch(name):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            target = _target(model, name)
            if target is None:
                raise CheckpointError(f"{f.name}: tensor {name!r} does not belong to a "
                                      f"{cfg.architecture} with this config.json")
            param, start, end = target
            want = (end - start, *param.shape[1:])
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{f.name}: tensor {name!r} has shape {tuple(tensor.shape)}"
                                      f", config.json implies {want}")
            key = (id(param), start, end)
            if key in filled:
                raise CheckpointError(f"{f.name}: tensor {name!r} appears twice")
            filled[key] = name
            param[start:end].copy_(tensor)
    bar.close()
    missing = [desc for key, desc in expected.items() if key not in filled]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {str(path)!r} lacks tensor(s): {shown}")


def _expected_slices(model: CausalLM) -> dict[tuple[int, int, int], str]:
    """Every (param, slice) a complete checkpoint must fill, named as Hugging Face names it."""
    cfg = model.config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    if cfg.qkv_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if cfg.o_bias:
        per_layer.append("self_attn.o_proj.bias")
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.{n}" for n in per_layer]
    out = {}
    for n in names:
        param, start, end = _target(model, n)  # type: ignore[misc]
        out[(id(param), start, end)] = n
    return out


def init_dummy(model: CausalLM, seed: int = 0) -> None:
    """Seeded random-normal weights for any config (benchmarks, smoke runs). Never zeros:
    zeros hide indexing bugs and run faster than real data. Norm weights are drawn around 1,
    matrices with std 1/sqrt(fan_in) so activations stay O(1) through any depth."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.05, generator=gen)
            elif p.dim() == 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5 if "embed" not in name else 1.0, generator=gen)
