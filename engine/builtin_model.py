"""The built-in default model: what pdserve serves when the user names no --model.

`pdserve-builtin-tiny` is a small Llama-architecture checkpoint (4 layers, hidden 256, GQA 4/2,
vocab 4096; about 5.2 M parameters, 21 MB in float32). Its small files ship in the package
(`engine/builtin/`: config.json, generation_config.json and a byte-level BPE tokenizer with a
Llama-3 chat template, made by `scripts/train_builtin_tokenizer.py`); its weights are not
shipped but drawn at first use from NumPy's PCG64 generator with a fixed seed, so every machine,
CPU or GPU, gets bit-identical weights without a download and without anything large in git.
The weights are random: the model produces fluent-looking nonsense, which is all a default needs
for smoke tests, demos and benchmarks of the serving machinery.

    from pdserve.engine.builtin_model import builtin_model_path
    path = builtin_model_path()   # a normal HF checkpoint folder, e.g. for AutoModelForCausalLM

`builtin_model_path()` materialises the checkpoint once per cache folder (`cache_dir`, else
$PDSERVE_CACHE_DIR, else ~/.cache/pdserve) and afterwards only checks a marker file. Before
writing it checks the generated weights and the shipped files against `engine/builtin/
manifest.json`, so a NumPy whose generator changed, or an edited data file, fails loudly
instead of serving a different model under the same name. Writing is atomic (a temp folder in
the same parent, then one rename), so any number of processes may start at once.

The weights hash (manifest "weights_sha256", `weights_sha256()`): SHA-256 over the bytes
b"pdserve-builtin-weights-v1\\n", then for every tensor in sorted-name order the line
f"{name}\\t<f4\\t{comma-separated shape}\\n" followed by its float32 little-endian C-order bytes.
Names and shapes are in the hash, so a layout change changes it even if the bytes do not.

`python -m pdserve.engine.builtin_model --print-hash` prints the hash of freshly generated weights;
`--write-manifest` re-records manifest.json after a deliberate change of the model or its files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

BUILTIN_MODEL_NAME = "pdserve-builtin-tiny"
GENERATOR = "numpy.random.PCG64"
DEFAULT_SEED = 20240611  # only used to create a manifest from scratch; the manifest's seed rules
CACHE_ENV = "PDSERVE_CACHE_DIR"
MANIFEST = "manifest.json"
# Shipped with the package and copied into every materialised folder, all hashed in the manifest.
SHIPPED_FILES = ("chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json")
WEIGHTS_FILE = "model.safetensors"
MARKER = ".pdserve-complete"  # written last, holds the stamp of what the folder contains
_HASH_PREFIX = b"pdserve-builtin-weights-v1\n"
_STALE_TMP_S = 3600.0  # temp folders older than this were left by a killed process


def _data_dir():
    return resources.files("pdserve.engine").joinpath("builtin")


def _read_data(name: str) -> bytes:
    return _data_dir().joinpath(name).read_bytes()


def load_manifest() -> dict[str, Any]:
    return json.loads(_read_data(MANIFEST))


def load_config() -> dict[str, Any]:
    """The shipped config.json, as a dict."""
    return json.loads(_read_data("config.json"))


def tensor_shapes(config: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the HF LlamaForCausalLM checkpoint (torch Linear layout:
    (out_features, in_features)), in sorted-name order."""
    c = load_config() if config is None else config
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q_dim, kv_dim = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    if c.get("tie_word_embeddings"):
        del shapes["lm_head.weight"]
    return dict(sorted(shapes.items()))


def builtin_weights(seed: int | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, float32, drawn from one PCG64 generator in sorted-name order.

    Linear weights are N(0, 1/fan_in), so each projection keeps activations at unit scale (the
    residual stream grows slowly over 4 layers and logits have a spread of about 1: greedy text
    wanders instead of repeating one token); the embedding is N(0, 1) because RMSNorm follows it;
    norm weights are 1 + 0.1 N(0, 1), close to transformers' ones but not trivially so. Everything
    is float32 arithmetic with float32 constants, so the bytes are the same on every platform.
    """
    if seed is None:
        seed = int(load_manifest()["seed"])
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, np.ndarray] = {}
    for name, shape in tensor_shapes().items():
        w = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) == 1:
            w *= np.float32(0.1)
            w += np.float32(1.0)
        elif name != "model.embed_tokens.weight":
            w *= np.float32(1.0 / math.sqrt(shape[1]))
        out[name] = w
    return out


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """The content hash of a weights dict (format in the module docstring)."""
    h = hashlib.sha256(_HASH_PREFIX)
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name], dtype="<f4")
        h.update(f"{name}\t<f4\t{','.join(str(d) for d in a.shape)}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shipped_files_checked(manifest: dict[str, Any]) -> dict[str, bytes]:
    """name -> bytes of every shipped file, each checked against the manifest."""
    expected: dict[str, str] = manifest["files"]
    if sorted(expected) != sorted(SHIPPED_FILES):
        raise RuntimeError(f"{MANIFEST} lists {sorted(expected)}, expected {sorted(SHIPPED_FILES)}")
    files = {name: _read_data(name) for name in SHIPPED_FILES}
    bad = [name for name, data in files.items() if _sha256(data) != expected[name]]
    if bad:
        raise RuntimeError(
            f"built-in model files {bad} in {_data_dir()} do not match the hashes in {MANIFEST}: "
            "the package data was modified; reinstall pdserve, or after a deliberate change run "
            "`python -m pdserve.engine.builtin_model --write-manifest`")
    return files


def _stamp(manifest: dict[str, Any]) -> str:
    """What a complete folder's marker holds: it pins the weights and every shipped file."""
    return json.dumps({"name": manifest["name"], "weights_sha256": manifest["weights_sha256"],
                       "files": dict(sorted(manifest["files"].items()))}, sort_keys=True) + "\n"


def _folder_name(manifest: dict[str, Any]) -> str:
    # weights hash, plus a short hash of the shipped files: a retrained tokenizer with the same
    # vocab size keeps the weights hash, and must not reuse a folder holding the old tokenizer
    files = _sha256(json.dumps(manifest["files"], sort_keys=True).encode())
    return f"{manifest['name']}-{manifest['weights_sha256'][:12]}-{files[:8]}"


def _is_complete(folder: Path, stamp: str) -> bool:
    try:
        return (folder / MARKER).read_text(encoding="utf-8") == stamp
    except OSError:
        return False


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve"


def builtin_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the materialised built-in checkpoint, written on first use (see module doc).

    Raises RuntimeError if the generated weights or the shipped files do not match the manifest.
    """
    manifest = load_manifest()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = base / _folder_name(manifest)
    stamp = _stamp(manifest)
    if _is_complete(target, stamp):
        return target

    files = _shipped_files_checked(manifest)
    weights = builtin_weights(int(manifest["seed"]))
    digest = weights_sha256(weights)
    if digest != manifest["weights_sha256"]:
        raise RuntimeError(
            f"the generated weights of {manifest['name']} hash to {digest}, but {MANIFEST} records "
            f"{manifest['weights_sha256']}: {GENERATOR} (numpy {np.__version__}) no longer draws "
            "the same numbers from the same seed, so this would be a different model under the "
            "same name. Use the numpy version the manifest was recorded with, or re-record it "
            "with `python -m pdserve.engine.builtin_model --write-manifest` (a new model).")

    from safetensors.numpy import save_file

    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(base, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=base))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache dir must stay readable
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        # "format": "pt" is what transformers requires of a safetensors checkpoint's metadata
        save_file(weights, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "pdserve_weights_sha256": digest})
        (tmp / MARKER).write_text(stamp, encoding="utf-8")
        _publish(tmp, target, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless another process won
    return target


def _publish(tmp: Path, target: Path, stamp: str) -> None:
    """Rename the finished `tmp` to `target`; if another process got there first, keep theirs."""
    for _ in range(5):
        try:
            os.rename(tmp, target)  # atomic; fails if target exists and is not an empty folder
            return
        except OSError:
            if _is_complete(target, stamp):
                return  # another process won the race: its folder is identical to ours
        # something without our marker is in the way (an interrupted manual copy, say): our own
        # folders only ever appear complete, so this is never a process still writing
        aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not create {target}")


def _remove_stale_temps(base: Path, folder: str) -> None:
    """Delete temp folders that a killed process left behind (only old ones: others may be live)."""
    now = time.time()
    for p in base.glob(f".{folder}.*.tmp"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def write_manifest(seed: int | None = None) -> dict[str, Any]:
    """(Re)record manifest.json from the shipped files and freshly generated weights.

    For developers after a deliberate change (scripts/train_builtin_tokenizer.py calls it);
    writes into the source tree, next to this module.
    """
    path = Path(__file__).resolve().parent / "builtin" / MANIFEST
    if seed is None:
        seed = int(json.loads(path.read_text())["seed"]) if path.exists() else DEFAULT_SEED
    files = {name: _sha256((path.parent / name).read_bytes()) for name in SHIPPED_FILES}
    manifest = {
        "name": BUILTIN_MODEL_NAME,
        "seed": seed,
        "generator": GENERATOR,
        "weights_sha256": weights_sha256(builtin_weights(seed)),
        "files": files,
        "recorded_with": {"numpy": np.__version__},
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.engine.builtin_model",
                                 description="The built-in default model " + BUILTIN_MODEL_NAME)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--print-hash", action="store_true",
                      help="print the weights hash of freshly generated weights")
    mode.add_argument("--write-manifest", action="store_true",
                      help="re-record engine/builtin/manifest.json (after changing the model)")
    mode.add_argument("--path", action="store_true",
                      help="materialise the checkpoint if needed and print its folder")
    ap.add_argument("--seed", type=int, default=None, help="with --print-hash/--write-manifest")
    ap.add_argument("--cache-dir", default=None, help=f"with --path (default ${CACHE_ENV} or "
                    "~/.cache/pdserve)")
    args = ap.parse_args(argv)
    if args.print_hash:
        print(weights_sha256(builtin_weights(args.seed)))
    elif args.write_manifest:
        print(write_manifest(args.seed)["weights_sha256"])
    else:
        print(builtin_model_path(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
