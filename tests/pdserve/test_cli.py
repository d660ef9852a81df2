"""The `pdserve` command as a user runs it: a real subprocess, real checkpoint files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pdserve import LLM, SamplingParams


def pdserve(*args: str, env: dict | None = None, timeout: float = 120):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PDSERVE_TORCH_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def test_top_level_help_lists_commands():
    r = pdserve("--help")
    assert r.returncode == 0
    assert "generate" in r.stdout and "PDSERVE_" in r.stdout


def test_generate_help_names_each_env_var():
    r = pdserve("generate", "--help")
    assert r.returncode == 0
    for var in ("PDSERVE_MODEL", "PDSERVE_MAX_MODEL_LEN", "PDSERVE_BLOCK_SIZE",
                "PDSERVE_KV_CACHE_MEMORY_BYTES", "PDSERVE_MAX_TOKENS", "PDSERVE_LOAD_FORMAT"):
        assert var in r.stdout.replace("\n", " ").replace("  ", " "), var


def test_generate_json_matches_the_offline_api(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    r = pdserve("generate", "--model", path, "--prompt", "Hello, world", "--max-tokens", "12",
                "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    llm = LLM(path, use_tqdm_on_load=False, device="cpu")
    want = llm.generate("Hello, world", SamplingParams(temperature=0, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert got["token_ids"] == want.outputs[0].token_ids and len(got["token_ids"]) == 12
    assert got["text"] == want.outputs[0].text
    assert got["prompt_token_ids"] == want.prompt_token_ids


def test_env_and_yaml_configure_generate(tiny_checkpoint, tmp_path):
    """flags > PDSERVE_* > --config YAML: the YAML says 3 tokens, the env 5, the flag 7."""
    path = str(tiny_checkpoint("llama"))
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: {path}\nmax-tokens: 3\nignore_eos: true\n")
    base = ("generate", "--config", str(cfg), "--prompt-token-ids", "5,6,7", "--json")
    r = pdserve(*base)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.splitlines()[-1])["token_ids"]) == 3
    r = pdserve(*base, env={"PDSERVE_MAX_TOKENS": "5"})
    assert len(json.loads(r.stdout.splitlines()[-1])["token_ids"]) == 5
    r = pdserve(*base, "--max-tokens", "7", env={"PDSERVE_MAX_TOKENS": "5"})
    assert len(json.loads(r.stdout.splitlines()[-1])["token_ids"]) == 7


@pytest.mark.parametrize("args, env, needle", [
    (("--max-modle-len", "5"), {}, "--max-model-len"),
    (("--block-size", "24"), {}, "power of two"),
    ((), {"PDSERVE_MAX_MODEL_LEN": "abc"}, "PDSERVE_MAX_MODEL_LEN"),
    ((), {"PDSERVE_MAX_MODLE_LEN": "5"}, "PDSERVE_MAX_MODLE_LEN"),
    (("--dtype", "float64"), {}, "dtype"),
])
def test_bad_options_exit_2_naming_the_key(args, env, needle, tiny_checkpoint):
    r = pdserve("generate", "--model", str(tiny_checkpoint("llama")), "--prompt", "x", *args,
                env=env)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_yaml_key_is_refused(tmp_path, tiny_checkpoint):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model: {tiny_checkpoint('llama')}\nmax_modle_len: 64\n")
    r = pdserve("generate", "--config", str(cfg), "--prompt", "x")
    assert r.returncode == 2 and "max_modle_len" in r.stderr and "max_model_len" in r.stderr


def test_runtime_errors_are_one_line(tmp_path, tiny_checkpoint):
    r = pdserve("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = pdserve("generate", "--model", str(tiny_checkpoint("llama")), "--prompt-token-ids",
                ",".join(["5"] * 600))
    assert r.returncode == 1 and "max_model_len" in r.stderr and "Traceback" not in r.stderr


def test_unknown_command():
    r = pdserve("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_generate_with_no_model_uses_the_builtin_one(tmp_path):
    r = pdserve("generate", "--prompt", "Hello, world", "--max-tokens", "5", "--ignore-eos",
                "--json", env={"PDSERVE_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["token_ids"]) == 5 and got["prompt_token_ids"][0] == 0  # <|begin_of_text|>
    assert any(p.name.startswith("pdserve-builtin-tiny") for p in tmp_path.iterdir())


# ---- the internal token: workers and a proxy of given workers fail closed ------------------

# runs the CLI and says whether torch was imported: a refusal must come before the engine
_MAIN = ("import json, sys; from pdserve.cli import main; rc = main(sys.argv[1:]); "
         "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")


def _run_main(*args: str, env: dict | None = None) -> tuple[dict, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("PDSERVE_INTERNAL_TOKEN", "PDSERVE_INSECURE_NO_TOKEN")}
    r = subprocess.run([sys.executable, "-c", _MAIN, *args], capture_output=True, text=True,
                       env={**base, **(env or {})}, timeout=60)
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.parametrize("args, env, needle", [
    ((), {}, "no internal token: a worker refuses to start"),
    ((), {"PDSERVE_INTERNAL_TOKEN": "change-me"}, "PDSERVE_INTERNAL_TOKEN=***: a placeholder"),
    (("--internal-token", "secret"), {}, "--internal-token=***: a placeholder"),
    (("--internal-token", "a1b2c3d4e5f6", "--insecure-no-token"), {}, "give one of them"),
])
@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_a_worker_refuses_to_start_without_a_real_token(role, args, env, needle):
    out, err = _run_main(role, "--port", "0", *args, env=env)
    assert out == {"rc": 2, "torch": False}, err  # refused before the engine (torch) loads
    line = err.strip()
    assert line.startswith(f"pdserve {role}: error: ") and needle in line and "\n" not in line
    assert "change-me" not in line and "a1b2c3d4e5f6" not in line  # the value is never shown
    if not args and not env:  # both ways out are named
        assert "--internal-token or PDSERVE_INTERNAL_TOKEN" in line
        assert "--insecure-no-token" in line


def test_insecure_no_token_starts_a_worker_with_a_warning(monkeypatch, caplog):
    from pdserve import cli, worker

    started = []
    monkeypatch.setattr(worker, "run_worker", lambda cfg: started.append(cfg) or 0)
    monkeypatch.delenv("PDSERVE_INTERNAL_TOKEN", raising=False)
    assert cli.main(["decode", "--port", "8300", "--insecure-no-token"]) == 0
    (cfg,) = started
    assert cfg.internal_token is None and cfg.insecure_no_token
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("running with no internal token (--insecure-no-token)" in r.getMessage()
               and "8300, 8301, 8302" in r.getMessage() for r in warned), warned


@pytest.mark.parametrize("args, env, needle", [
    ((), {}, "no internal token: the proxy of workers given by URL refuses to start"),
    ((), {"PDSERVE_INTERNAL_TOKEN": "<your-token>"}, "PDSERVE_INTERNAL_TOKEN=***: a placeholder"),
])
def test_the_proxy_of_given_workers_refuses_to_start_without_a_real_token(args, env, needle):
    out, err = _run_main("serve", "--prefill", "http://127.0.0.1:9", "--decode",
                         "http://127.0.0.1:10", "--port", "0", *args, env=env)
    assert out["rc"] == 2, err
    line = err.strip()
    assert line.startswith("pdserve serve: error: ") and needle in line and "\n" not in line
