"""The built-in default model: recorded content hash, shipped files, atomic materialisation,
and that transformers loads the result as an ordinary Llama checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from pdserve.engine import builtin_model as bm

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "engine" / "builtin"


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return bm.builtin_weights()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return bm.builtin_model_path(tmp_path_factory.mktemp("builtin-cache"))


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop(bm.CACHE_ENV, None)
    return env


# -- content hash and shipped files ----------------------------------------------------------


def test_weights_hash_matches_manifest(weights):
    manifest = bm.load_manifest()
    assert manifest["name"] == bm.BUILTIN_MODEL_NAME
    assert manifest["generator"] == "numpy.random.PCG64"
    assert bm.weights_sha256(weights) == manifest["weights_sha256"]


def test_weights_are_deterministic_and_seed_dependent(weights):
    again = bm.builtin_weights(bm.load_manifest()["seed"])
    assert list(again) == list(weights) == sorted(weights)
    assert all(np.array_equal(again[k], weights[k]) for k in weights)
    other = bm.builtin_weights(bm.load_manifest()["seed"] + 1)
    assert bm.weights_sha256(other) != bm.weights_sha256(weights)


def test_weights_layout_scales_and_no_zero_tensor(weights):
    cfg = json.loads((DATA / "config.json").read_text())
    assert len(weights) == 2 + 1 + 9 * cfg["num_hidden_layers"]
    assert weights["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)
    assert weights["model.layers.3.mlp.down_proj.weight"].shape == (256, 768)
    for name, w in weights.items():
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        # no all-zero tensor (float32 normals may hit an exact 0.0 now and then: harmless)
        assert np.count_nonzero(w) > 0.999 * w.size, name
        if w.ndim == 1:
            assert abs(float(w.mean()) - 1.0) < 0.03 and 0.07 < float(w.std()) < 0.13, name
        else:
            want = 1.0 if name == "model.embed_tokens.weight" else w.shape[1] ** -0.5
            assert abs(float(w.std()) / want - 1.0) < 0.05, name


def test_hash_covers_names_and_shapes(weights):
    digest = bm.weights_sha256(weights)
    reshaped = dict(weights)
    reshaped["model.norm.weight"] = weights["model.norm.weight"].reshape(16, 16)
    assert bm.weights_sha256(reshaped) != digest
    renamed = {k.replace("model.norm", "model.final_norm"): v for k, v in weights.items()}
    assert bm.weights_sha256(renamed) != digest


def test_shipped_files_match_manifest():
    manifest = bm.load_manifest()
    assert sorted(manifest["files"]) == sorted(bm.SHIPPED_FILES)
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


def test_package_data_ships_every_builtin_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["pdserve.engine"]
    for name in (*bm.SHIPPED_FILES, bm.MANIFEST):
        assert any(PurePosixPath("builtin", name).match(g) for g in globs), name


def test_config_agrees_with_tokenizer_and_loads_in_transformers():
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(str(DATA), local_files_only=True)
    tok = json.loads((DATA / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert cfg.vocab_size == len(tok["model"]["vocab"]) == 4096
    assert cfg.bos_token_id == ids["<|begin_of_text|>"]
    assert cfg.eos_token_id == [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 768, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 64)
    assert cfg.rope_parameters["rope_type"] == "default"
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert not cfg.tie_word_embeddings


def test_print_hash_cli():
    out = subprocess.run([sys.executable, "-m", "pdserve.engine.builtin_model", "--print-hash"],
                         capture_output=True, text=True, env=_child_env(), cwd=ROOT, check=True)
    assert out.stdout.strip() == bm.load_manifest()["weights_sha256"]


# -- materialisation -------------------------------------------------------------------------


def test_materialise_then_reuse(tmp_path, monkeypatch):
    start = time.perf_counter()
    path = bm.builtin_model_path(tmp_path)
    assert time.perf_counter() - start < 2.0
    assert path.parent == tmp_path and path.name.startswith(bm.BUILTIN_MODEL_NAME + "-")
    assert bm.load_manifest()["weights_sha256"][:12] in path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp folder left
    assert {p.name for p in path.iterdir()} == {*bm.SHIPPED_FILES, bm.WEIGHTS_FILE, bm.MARKER}
    mtime = (path / bm.WEIGHTS_FILE).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("regenerated weights for a complete folder")

    monkeypatch.setattr(bm, "builtin_weights", boom)
    assert bm.builtin_model_path(tmp_path) == path
    assert (path / bm.WEIGHTS_FILE).stat().st_mtime_ns == mtime


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(bm.CACHE_ENV, str(tmp_path / "envcache"))
    assert bm.builtin_model_path().parent == tmp_path / "envcache"


def test_incomplete_folder_is_replaced(tmp_path):
    path = bm.builtin_model_path(tmp_path)
    (path / bm.MARKER).unlink()  # e.g. an interrupted manual copy
    (path / bm.WEIGHTS_FILE).write_bytes(b"truncated")
    assert bm.builtin_model_path(tmp_path) == path
    assert (path / bm.MARKER).exists() and (path / bm.WEIGHTS_FILE).stat().st_size > 20_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_generator_change_raises_before_writing(tmp_path, monkeypatch):
    manifest = dict(bm.load_manifest(), weights_sha256="0" * 64)
    monkeypatch.setattr(bm, "load_manifest", lambda: manifest)
    with pytest.raises(RuntimeError, match=f"numpy {np.__version__}"):
        bm.builtin_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_modified_shipped_file_raises(tmp_path, monkeypatch):
    manifest = bm.load_manifest()
    manifest = dict(manifest, files=dict(manifest["files"], **{"tokenizer.json": "0" * 64}))
    monkeypatch.setattr(bm, "load_manifest", lambda: manifest)
    with pytest.raises(RuntimeError, match=r"tokenizer\.json"):
        bm.builtin_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_materialisation(tmp_path):
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    gate.mkdir()
    # each child signals it has imported everything, then waits for the go file, so all four
    # generate and rename at the same moment
    child = textwrap.dedent("""
        import sys, time
        from pathlib import Path, PurePosixPath
        from pdserve.engine.builtin_model import builtin_model_path
        gate = Path(sys.argv[2])
        (gate / f"ready-{sys.argv[3]}").touch()
        while not (gate / "go").exists():
            time.sleep(0.005)
        print(builtin_model_path(sys.argv[1]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(cache), str(gate), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_child_env(), cwd=ROOT) for i in range(4)]
    deadline = time.monotonic() + 60
    while len(list(gate.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    (gate / "go").touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # losers cleaned up
    assert (path / bm.MARKER).read_text() == bm._stamp(bm.load_manifest())


# -- the materialised folder through transformers --------------------------------------------


def test_transformers_loads_builtin_weights(model_dir, weights, hf_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    assert model.dtype == torch.float32
    state = model.state_dict()
    assert set(state) == set(weights)
    for name, w in weights.items():
        assert torch.equal(state[name], torch.from_numpy(w)), name

    # random weights, but greedy text must not collapse onto one repeated token
    ids = hf_tokenizer("The quick brown fox", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(set(out)) > 4, out


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading and trailing spaces\t\n\r\n",
    "naïve café, Straße, ¿qué?",
    "中文：你好，世界！日本語のテキスト。한국어",
    "emoji 🙂🚀 👩‍👩‍👧 🇫🇷 ❤️",
    "code: def f(x):\n    return x ** 2  # ok",
    "",
])
def test_tokenizer_round_trips_utf8(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text
    with_bos = hf_tokenizer.encode(text)
    assert with_bos[0] == hf_tokenizer.bos_token_id and with_bos[1:] == ids


def test_tokenizer_specials(hf_tokenizer):
    assert len(hf_tokenizer) == 4096
    assert hf_tokenizer.bos_token == "<|begin_of_text|>"
    assert hf_tokenizer.eos_token == "<|eot_id|>"
    for tok in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(hf_tokenizer.encode(tok, add_special_tokens=False)) == 1, tok


def test_chat_template(hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi 🙂 "},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"},
                                     {"type": "text", "text": "b"}]},
    ]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi 🙂<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nab<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    plain = hf_tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert plain.endswith("Hi 🙂<|eot_id|>")
    ids = hf_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert ids.count(hf_tokenizer.bos_token_id) == 1 and ids[0] == hf_tokenizer.bos_token_id
