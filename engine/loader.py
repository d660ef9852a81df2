"""Weight loading: local safetensors checkpoints (single file or sharded) and `dummy` weights.

Hugging Face names map onto our fused parameters: q/k/v_proj stack into qkv_proj and
gate/up_proj into gate_up_proj, each checkpoint tensor copied into its slice. Under tensor
parallelism each rank reads only its own slices (safetensors `get_slice`): its heads' rows
of q/k/v, its rows of gate/up, its columns of o_proj/down_proj, its vocabulary rows. Every
parameter must be filled exactly once and every checkpoint tensor must have a home; anything
else is an error naming the tensor, because a silently half-loaded model still generates
plausible-looking text.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _iter_files(files: list[Path]) -> Iterator[tuple[str, Any, Path]]:
    """(tensor name, open safetensors handle, file) for every tensor of every file."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, sf, f
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e


@dataclass(frozen=True)
class _Target:
    """Where a checkpoint tensor goes: rows [start, end) of `param`, from the slice [lo, hi)
    of the checkpoint tensor along `dim` (of `full` entries there). Without tensor
    parallelism that is the whole tensor; a rank reads only its slice. lo == hi: this rank
    holds zeros there (a row-parallel bias lives on rank 0)."""

    param: torch.Tensor
    start: int
    end: int
    dim: int = 0
    lo: int = 0
    hi: int | None = None  # None: the whole dimension
    full: int | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        return id(self.param), self.start, self.end

    def want(self) -> tuple[int, ...]:
        """The checkpoint tensor's shape that config.json implies."""
        shape = [self.end - self.start, *self.param.shape[1:]]
        if self.full is not None:
            shape[self.dim] = self.full
        return tuple(shape)


def _target(model: CausalLM, name: str) -> _Target | None:
    """Where checkpoint tensor `name` lands in this rank's model, or None."""
    cfg = model.config
    rank, size = (model.tp.rank, model.tp.size) if model.tp is not None else (0, 1)

    def rows(param: torch.Tensor, start: int, n: int, full: int) -> _Target:
        # column-parallel: this rank's n of the tensor's `full` rows, at `start` in param
        if size == 1:
            return _Target(param, start, start + n)
        return _Target(param, start, start + n, 0, rank * n, (rank + 1) * n, full)

    if name.startswith("model."):
        name = name[len("model."):]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        if name in ("embed_tokens.weight", "lm_head.weight"):
            param = model.embed_tokens.weight if name[0] == "e" else model.lm_head.weight
            if size == 1:
                return _Target(param, 0, cfg.vocab_size)
            lo, hi = model.vocab_start, model.vocab_start + model.vocab_rows
            hi = min(hi, cfg.vocab_size)  # the last rank's padding rows stay zero
            return _Target(param, 0, hi - lo, 0, lo, hi, cfg.vocab_size)
        if name == "norm.weight":
            return _Target(model.norm.weight, 0, cfg.hidden_size)
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_hidden_layers:
        return None
    layer = model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.intermediate_size
    ql, kvl, il = q // size, kv // size, inter // size  # this rank's share
    module, _, kind = rest.rpartition(".")
    if module in ("input_layernorm", "post_attention_layernorm") and kind == "weight":
        return _Target(getattr(layer, module).weight, 0, cfg.hidden_size)
    if kind not in ("weight", "bias"):
        return None
    column = {  # fused column-parallel layouts: [q | k | v], [gate | up]
        "self_attn.q_proj": (attn.qkv_proj, 0, ql, q),
        "self_attn.k_proj": (attn.qkv_proj, ql, kvl, kv),
        "self_attn.v_proj": (attn.qkv_proj, ql + kvl, kvl, kv),
        "mlp.gate_proj": (mlp.gate_up_proj, 0, il, inter),
        "mlp.up_proj": (mlp.gate_up_proj, il, il, inter),
    }
    if module in column:
        lin, start, n, full = column[module]
        param = getattr(lin, kind)
        return rows(param, start, n, full) if param is not None else None
    row = {"self_attn.o_proj": (attn.o_proj, ql, q), "mlp.down_proj": (mlp.down_proj, il, inter)}
    if module in row:
        lin, n, full = row[module]
        param = getattr(lin, kind)
        if param is None:
            return None
        if kind == "bias" or size == 1:  # a bias adds once: rank 0 holds it, the others zeros
            return _Target(param, 0, cfg.hidden_size, 0, 0, None if rank == 0 else 0)
        # row-parallel: this rank's n input features (columns) of the tensor's `full`
        return _Target(param, 0, cfg.hidden_size, 1, rank * n, (rank + 1) * n, full)
    return None


def _read(sf: Any, name: str, t: _Target) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `name` (only those bytes are read)."""
    if t.hi is None:
        return sf.get_tensor(name)
    sl = sf.get_slice(name)
    return sl[t.lo:t.hi] if t.dim == 0 else sl[:, t.lo:t.hi]


def load_safetensors(model: CausalLM, path: str | os.PathLike, progress: bool = True) -> None:
    """Copy every checkpoint tensor (this rank's slice of it, under tensor parallelism)
    into its parameter slice, with dtype cast and device move."""
    from safetensors import SafetensorError

    files = checkpoint_files(path)
    cfg = model.config
    filled: dict[tuple[int, int, int], str] = {}  # (param id, start, end) -> tensor name
    expected = _expected_slices(model)
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc="Loading weights", disable=not progress, leave=False)
    with torch.no_grad():
        if model.tp is not None:  # rows no checkpoint tensor fills (vocabulary padding)
            model.embed_tokens.weight.zero_()
            model.lm_head.weight.zero_()
        for name, sf, f in _iter_files(files):
            if _IGNORED.fullmatch(name):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            target = _target(model, name)
            if target is None:
                raise CheckpointError(f"{f.name}: tensor {name!r} does not belong to a "
                                      f"{cfg.architecture} with this config.json")
            try:
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != target.want():
                    raise CheckpointError(f"{f.name}: tensor {name!r} has shape {shape}, "
                                          f"config.json implies {target.want()}")
                if target.key in filled:
                    raise CheckpointError(f"{f.name}: tensor {name!r} appears twice")
                filled[target.key] = name
                dest = target.param[target.start:target.end]
                if target.lo == target.hi:
                    dest.zero_()
                    continue
                tensor = _read(sf, name, target)
            except SafetensorError as e:
                raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from e
            bar.update(math.prod(shape) * tensor.element_size())  # the file's bytes, read or not
            dest.copy_(tensor)
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
        out[_target(model, n).key] = n  # type: ignore[union-attr]
    return out


def init_dummy(model: CausalLM, seed: int = 0) -> None:
    """Seeded random-normal weights for any config (benchmarks, smoke runs). Never zeros:
    zeros hide indexing bugs and run faster than real data. Norm weights are drawn around 1,
    matrices with std 1/sqrt(fan_in) so activations stay O(1) through any depth. A
    tensor-parallel rank draws each whole tensor as one process would and keeps its shard,
    so the model is the same at any tensor_parallel_size."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape, cut = (p.shape, None) if model.tp is None else _dummy_shard(model, name, p)
            full = p if cut is None else torch.empty(shape, dtype=p.dtype, device=device)
            if name.endswith("norm.weight"):
                full.normal_(1.0, 0.05, generator=gen)
            elif full.dim() == 1:
                full.normal_(0.0, 0.02, generator=gen)
            else:
                full.normal_(0.0, full.shape[1] ** -0.5 if "embed" not in name else 1.0,
                             generator=gen)
            if cut is not None:
                p.copy_(cut(full))


def _dummy_shard(model: CausalLM, name: str, p: torch.Tensor
                 ) -> tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """Parameter `name`'s shape in one process and how this rank's shard is cut from it
    (the loader's layout: `_target`)."""
    cfg = model.config
    rank, size = model.tp.rank, model.tp.size  # type: ignore[union-attr]
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.intermediate_size
    kind = name.rsplit(".", 2)[-2]  # embed_tokens, lm_head, qkv_proj, o_proj, ...

    def rows(parts: list[tuple[int, int]]) -> Callable[[torch.Tensor], torch.Tensor]:
        # column-parallel: this rank's share of each (offset, size) part, in order
        return lambda f: torch.cat([f[o + rank * n // size:o + (rank + 1) * n // size]
                                    for o, n in parts])

    if kind in ("embed_tokens", "lm_head"):
        lo, hi = model.vocab_start, min(model.vocab_start + model.vocab_rows, cfg.vocab_size)

        def vocab(f: torch.Tensor) -> torch.Tensor:
            out = f.new_zeros(p.shape)  # the last rank's padding rows stay zero
            out[:hi - lo] = f[lo:hi]
            return out

        return (cfg.vocab_size, *p.shape[1:]), vocab
    if kind == "qkv_proj":
        return (q + 2 * kv, *p.shape[1:]), rows([(0, q), (q, kv), (q + kv, kv)])
    if kind == "gate_up_proj":
        return (2 * inter, *p.shape[1:]), rows([(0, inter), (inter, inter)])
    if kind in ("o_proj", "down_proj"):
        if p.dim() == 1:  # the bias adds once: rank 0's
            return tuple(p.shape), lambda f: f if rank == 0 else torch.zeros_like(f)
        n = q if kind == "o_proj" else inter
        return (p.shape[0], n), lambda f: f[:, rank * n // size:(rank + 1) * n // size]
    return tuple(p.shape), lambda f: f
