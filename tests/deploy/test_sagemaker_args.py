"""`sagemaker_args`: SageMaker-style SM_PDSERVE_* / SM_VLLM_* variables -> `pdserve serve` flags
(vLLM's sagemaker-entrypoint.sh rules, plus pdserve's handling of vLLM-only options)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pdserve.config import ConfigError, build_config
from pdserve.sagemaker import (
    PORT_ENV,
    VLLM_DROPPED,
    masked,
    sagemaker_args,
    secrets_to_env,
    serve_options,
    translate,
)
from pdserve.serve import ServeConfig

pytestmark = pytest.mark.timeout(60)

DEFAULTS = ["--host", "0.0.0.0", "--port", "8080"]


def build(args: list[str]) -> ServeConfig:
    """What `pdserve serve` would make of the args (flags only: an empty environment)."""
    return build_config(ServeConfig, args, env={})


def test_port_8080_and_every_interface_by_default() -> None:
    assert sagemaker_args({}) == DEFAULTS
    cfg = build(sagemaker_args({}))
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8080)


def test_prefix_stripped_lowercased_underscores_to_dashes() -> None:
    args = sagemaker_args({"SM_PDSERVE_MAX_MODEL_LEN": "512", "SM_PDSERVE_MODEL": "/opt/ml/model",
                           "UNRELATED": "x", "PDSERVE_SEED": "3", "SM_OTHER_THING": "y"})
    assert args == DEFAULTS + ["--max-model-len", "512", "--model", "/opt/ml/model"]
    cfg = build(args)
    assert (cfg.max_model_len, cfg.model) == (512, "/opt/ml/model")


def test_empty_value_is_a_bare_flag_and_booleans_take_true_false() -> None:
    assert sagemaker_args({"SM_PDSERVE_ENABLE_PREFIX_CACHING": ""})[4:] == [
        "--enable-prefix-caching"]
    assert sagemaker_args({"SM_PDSERVE_SKIP_TOKENIZER_INIT": ""})[4:] == [
        "--skip-tokenizer-init"]
    assert sagemaker_args({"SM_PDSERVE_NO_ENABLE_PREFIX_CACHING": ""})[4:] == [
        "--no-enable-prefix-caching"]
    assert sagemaker_args({"SM_PDSERVE_ENABLE_PREFIX_CACHING": "false"})[4:] == [
        "--no-enable-prefix-caching"]
    assert sagemaker_args({"SM_PDSERVE_ALLOW_CREDENTIALS": "True"})[4:] == ["--allow-credentials"]
    assert build(sagemaker_args({"SM_PDSERVE_ENABLE_PREFIX_CACHING": "0"})).enable_prefix_caching \
        is False
    with pytest.raises(ConfigError, match="SM_PDSERVE_ENABLE_PREFIX_CACHING"):
        sagemaker_args({"SM_PDSERVE_ENABLE_PREFIX_CACHING": "maybe"})


def test_an_option_that_needs_a_value_refuses_an_empty_one_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="SM_PDSERVE_MAX_NUM_SEQS is empty"):
        sagemaker_args({"SM_PDSERVE_MAX_NUM_SEQS": ""})


def test_list_options_take_comma_separated_values_like_their_pdserve_variables() -> None:
    args = sagemaker_args({"SM_PDSERVE_PREFILL": "http://p1:8100, http://p2:8100",
                           "SM_PDSERVE_DECODE": "http://d:8200"})
    cfg = build(args)
    assert cfg.prefill == ["http://p1:8100", "http://p2:8100"]
    assert cfg.decode == ["http://d:8200"]


def test_unknown_pdserve_name_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"SM_PDSERVE_MAX_MODEL_LENGTH.*"
                                          r"did you mean SM_PDSERVE_MAX_MODEL_LEN"):
        sagemaker_args({"SM_PDSERVE_MAX_MODEL_LENGTH": "5"})


def test_vllm_variables_map_to_the_options_pdserve_shares() -> None:
    env = {"SM_VLLM_MODEL": "/opt/ml/model", "SM_VLLM_MAX_NUM_SEQS": "64",
           "SM_VLLM_GPU_MEMORY_UTILIZATION": "0.85", "SM_VLLM_DTYPE": "half",
           "SM_VLLM_SERVED_MODEL_NAME": "llama", "SM_VLLM_API_KEY": "sk-1",
           "SM_VLLM_MAX_MODEL_LEN": "4096", "SM_VLLM_NO_ENABLE_PREFIX_CACHING": ""}
    cfg = build(sagemaker_args(env))
    assert cfg.model == "/opt/ml/model" and cfg.max_num_seqs == 64
    assert cfg.gpu_memory_utilization == 0.85 and cfg.max_model_len == 4096
    assert cfg.dtype == "float16"  # vLLM's "half"
    assert cfg.served_model_name == ["llama"] and cfg.api_key == ["sk-1"]
    assert cfg.enable_prefix_caching is False


def test_vllm_only_options_are_dropped_with_one_warning_naming_them(
        caplog: pytest.LogCaptureFixture) -> None:
    env = {"SM_VLLM_TRUST_REMOTE_CODE": "", "SM_VLLM_DISABLE_LOG_REQUESTS": "",
           "SM_VLLM_SWAP_SPACE": "4", "SM_VLLM_SOME_FUTURE_FLAG": "7",
           "SM_VLLM_MAX_NUM_SEQS": "8"}
    with caplog.at_level(logging.WARNING, logger="pdserve.sagemaker"):
        args = sagemaker_args(env)
    assert args == DEFAULTS + ["--max-num-seqs", "8"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for flag in ("--trust-remote-code", "--disable-log-requests", "--swap-space",
                 "--some-future-flag"):
        assert flag in warnings[0]
    assert VLLM_DROPPED["trust-remote-code"] in warnings[0]
    assert "not a pdserve option" in warnings[0]  # the unknown one
    assert [f for f, _ in translate(env).dropped] == [
        "--disable-log-requests", "--some-future-flag", "--swap-space", "--trust-remote-code"]


def test_enforce_eager_follows_whether_pdserve_has_the_option(
        caplog: pytest.LogCaptureFixture) -> None:
    """Shared options are read from ServeConfig: once pdserve has --enforce-eager (CUDA
    graphs), SM_VLLM_ENFORCE_EAGER= sets it; before, it was dropped with the warning."""
    env = {"SM_VLLM_ENFORCE_EAGER": ""}
    with caplog.at_level(logging.WARNING, logger="pdserve.sagemaker"):
        args = sagemaker_args(env)
    if "enforce-eager" in serve_options():
        assert args == DEFAULTS + ["--enforce-eager"] and not caplog.records
        assert build(args).enforce_eager is True
    else:
        assert args == DEFAULTS and "--enforce-eager" in caplog.records[0].getMessage()


def test_every_dropped_name_is_one_pdserve_lacks() -> None:
    shared = set(serve_options())
    assert not shared & set(VLLM_DROPPED), "an option pdserve has would be dropped"


def test_no_warning_when_nothing_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdserve.sagemaker"):
        sagemaker_args({"SM_VLLM_MAX_NUM_SEQS": "8", "SM_VLLM_TENSOR_PARALLEL_SIZE": "1"})
    assert not caplog.records


@pytest.mark.parametrize("name", ["PIPELINE_PARALLEL_SIZE", "DATA_PARALLEL_SIZE"])
def test_parallel_sizes_are_a_no_op_at_1_and_refused_otherwise(name: str) -> None:
    assert sagemaker_args({f"SM_VLLM_{name}": "1"}) == DEFAULTS
    with pytest.raises(ConfigError, match=f"SM_VLLM_{name}='2'"):
        sagemaker_args({f"SM_VLLM_{name}": "2"})


def test_pipeline_parallel_refusal_points_at_tensor_parallel_in_sagemaker_words() -> None:
    with pytest.raises(ConfigError, match="SM_VLLM_TENSOR_PARALLEL_SIZE.*SM_PDSERVE_LOCAL_DEV"):
        sagemaker_args({"SM_VLLM_PIPELINE_PARALLEL_SIZE": "2"})


def test_tensor_parallel_size_is_honoured() -> None:
    # serve's own option: each local worker is sharded over that many ranks
    args = sagemaker_args({"SM_VLLM_TENSOR_PARALLEL_SIZE": "2"})
    assert args == DEFAULTS + ["--tensor-parallel-size", "2"]
    assert build(args).tensor_parallel_size == 2
    assert build(sagemaker_args({"SM_PDSERVE_TENSOR_PARALLEL_SIZE": "2"})).tensor_parallel_size == 2
    # a value serve refuses is refused naming its option
    with pytest.raises(ConfigError, match="tensor"):
        build(sagemaker_args({"SM_VLLM_TENSOR_PARALLEL_SIZE": "zero"}))


def test_quantization_is_refused_unless_none() -> None:
    assert sagemaker_args({"SM_VLLM_QUANTIZATION": "none"}) == DEFAULTS
    with pytest.raises(ConfigError, match="unquantized"):
        sagemaker_args({"SM_VLLM_QUANTIZATION": "awq"})


def test_port_override_last_wins_and_pdserve_names_win_over_vllm_names() -> None:
    assert build(sagemaker_args({"SM_VLLM_PORT": "9000"})).port == 9000
    args = sagemaker_args({"SM_VLLM_PORT": "9000", "SM_PDSERVE_PORT": "9100"})
    assert args == DEFAULTS + ["--port", "9000", "--port", "9100"]
    assert build(args).port == 9100
    assert build(sagemaker_args({"SM_PDSERVE_HOST": "127.0.0.1"})).host == "127.0.0.1"
    # SageMaker's multi-container endpoints name the port in SAGEMAKER_BIND_TO_PORT
    assert build(sagemaker_args({PORT_ENV: "8085"})).port == 8085


def test_secrets_travel_in_the_environment_not_argv() -> None:
    args = sagemaker_args({"SM_PDSERVE_API_KEY": "sk-one,sk-two",
                           "SM_PDSERVE_INTERNAL_TOKEN": "s3cr3t", "SM_PDSERVE_MAX_NUM_SEQS": "4"})
    rest, env = secrets_to_env(args)
    assert rest == DEFAULTS + ["--max-num-seqs", "4"]
    assert env == {"PDSERVE_API_KEY": "sk-one,sk-two", "PDSERVE_INTERNAL_TOKEN": "s3cr3t"}
    cfg = build_config(ServeConfig, rest, env=env)
    assert (cfg.api_key, cfg.internal_token, cfg.max_num_seqs) == (["sk-one", "sk-two"],
                                                                   "s3cr3t", 4)
    shown = " ".join(masked(args))
    assert "sk-" not in shown and "s3cr3t" not in shown and shown.count("***") == 3


def test_dry_run_prints_the_serve_command_with_secrets_masked() -> None:
    env = {"PATH": "/usr/bin:/bin", "SM_VLLM_MAX_NUM_SEQS": "8", "SM_VLLM_DISABLE_LOG_STATS": "",
           "SM_PDSERVE_API_KEY": "sk-secret"}
    out = subprocess.run([sys.executable, "-m", "pdserve", "sagemaker", "serve", "--dry-run",
                          "--max-model-len", "256"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("pdserve serve --host 0.0.0.0 --port 8080 --max-num-seqs 8 "
                                  "--api-key '***' --max-model-len 256")
    assert "--disable-log-stats" in out.stderr and "sk-secret" not in out.stdout + out.stderr
    # the key guards /invocations too, and SageMaker's InvokeEndpoint sends no Authorization
    assert "WARNING pdserve.sagemaker: an API key is set: /invocations needs" in out.stderr


def test_a_refused_option_exits_2_with_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "pdserve", "sagemaker", "--dry-run"],
                         env={"PATH": "/usr/bin:/bin", "SM_VLLM_PIPELINE_PARALLEL_SIZE": "4"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "pdserve sagemaker: error: SM_VLLM_PIPELINE_PARALLEL_SIZE='4'")
