"""Tests for pdserve.config: precedence, conversion, refusals, help, describe."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from pdserve.config import (
    ConfigError,
    add_arguments,
    build_config,
    config_sources,
    describe,
    env_name,
    option,
    role_config,
)


def _positive(v: int) -> str | None:
    return None if v > 0 else "must be > 0"


@role_config("test-alpha")
@dataclass(frozen=True)
class AlphaConfig:
    model: str = option(help="model name or path")
    max_model_len: int = option(4096, help="longest sequence", check=_positive)
    temperature: float = option(1.0, help="sampling temperature")
    enforce_eager: bool = option(False, help="disable CUDA graphs")
    served_name: str | None = option(None, help="name reported by the API")
    cache_dir: Path | None = option(None, help="where weights are cached")
    gpu_ids: list[int] = option(default_factory=lambda: [0], help="GPUs to use")
    tags: list[str] = option(default_factory=list, help="free-form tags")
    dtype: Literal["auto", "bfloat16", "float16"] = option("auto", help="weight dtype")
    api_key: str | None = option(None, help="bearer token", secret=True)


@role_config("test-beta")
@dataclass(frozen=True)
class BetaConfig:
    beta_port: int = option(9000, help="port of the beta role")


@dataclass(frozen=True)
class CrossConfig:
    low: int = option(1, help="lower bound")
    high: int = option(2, help="upper bound")

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must be <= high")


def build(argv: list[str] | None = None, env: dict[str, str] | None = None) -> AlphaConfig:
    return build_config(AlphaConfig, argv or [], env=env or {})


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_env_name() -> None:
    assert env_name("max_model_len") == "PDSERVE_MAX_MODEL_LEN"


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path, "model: from-file\nmax_model_len: 300\ntemperature: 0.5\nenforce_eager: true\n"
    )
    env = {"PDSERVE_MAX_MODEL_LEN": "200", "PDSERVE_TEMPERATURE": "0.25"}
    argv = ["--config", str(cfg_file), "--max-model-len", "100"]
    cfg = build(argv, env)
    assert cfg.max_model_len == 100
    assert cfg.temperature == 0.25
    assert cfg.model == "from-file"
    assert cfg.enforce_eager is True
    assert cfg.dtype == "auto"
    sources = config_sources(cfg)
    assert sources["max_model_len"] == "flag"
    assert sources["temperature"] == "env"
    assert sources["model"] == "file"
    assert sources["enforce_eager"] == "file"
    assert sources["dtype"] == "default"
    assert set(sources) == {f.name for f in dataclasses.fields(AlphaConfig)}

    # One key, each level removed in turn.
    assert build(["--config", str(cfg_file)], env).max_model_len == 200
    assert build(["--config", str(cfg_file)]).max_model_len == 300
    assert build(["--model", "m"]).max_model_len == 4096


def test_config_file_from_env(tmp_path: Path) -> None:
    cfg_file = write(tmp_path, "model: via-env\n", name="c.yml")
    cfg = build([], {"PDSERVE_CONFIG": str(cfg_file)})
    assert cfg.model == "via-env"
    assert config_sources(cfg)["model"] == "file"


def test_help_lists_every_env_var_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_config(AlphaConfig, ["--help"], env={}, prog="pdserve alpha")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    # argparse may wrap "[env: X]" across lines; the name itself is one word.
    for f in dataclasses.fields(AlphaConfig):
        assert env_name(f.name) in out
    assert "PDSERVE_CONFIG" in out
    assert "--no-enforce-eager" in out
    assert "{auto,bfloat16,float16}" in out
    assert "(default: 4096)" in out
    assert "(required)" in out


def test_add_arguments_on_foreign_parser() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(BetaConfig, parser)
    assert vars(parser.parse_args(["--beta-port", "1"])) == {"beta_port": "1"}
    assert vars(parser.parse_args([])) == {}  # only given flags appear


def test_bool_flags() -> None:
    assert build(["--model", "m", "--enforce-eager"]).enforce_eager is True
    assert (
        build(
            ["--model", "m", "--no-enforce-eager"], {"PDSERVE_ENFORCE_EAGER": "yes"}
        ).enforce_eager
        is False
    )
    for text, want in [("TRUE", True), ("1", True), ("on", True), ("No", False), ("0", False)]:
        assert build(["--model", "m"], {"PDSERVE_ENFORCE_EAGER": text}).enforce_eager is want
    with pytest.raises(ConfigError, match="PDSERVE_ENFORCE_EAGER='maybe'") as exc:
        build(["--model", "m"], {"PDSERVE_ENFORCE_EAGER": "maybe"})
    assert exc.value.key == "enforce_eager"


def test_optional_none_from_env_and_yaml(tmp_path: Path) -> None:
    for text in ["", "none", "NULL"]:
        cfg = build(["--model", "m"], {"PDSERVE_SERVED_NAME": text})
        assert cfg.served_name is None
        assert config_sources(cfg)["served_name"] == "env"
    assert build(["--model", "m"], {"PDSERVE_SERVED_NAME": "x"}).served_name == "x"
    cfg_file = write(tmp_path, "model: m\nserved_name: null\ncache_dir: ~/w\n")
    cfg = build(["--config", str(cfg_file)], {})
    assert cfg.served_name is None
    assert cfg.cache_dir == Path("~/w").expanduser()
    bad = write(tmp_path, "model: null\n", name="bad.yaml")
    with pytest.raises(ConfigError, match="model=None: must not be null"):
        build(["--config", str(bad)])


def test_lists_from_each_source(tmp_path: Path) -> None:
    assert build(["--model", "m", "--gpu-ids", "2", "3"]).gpu_ids == [2, 3]
    # a repeated flag adds to the list (`--prefill A --prefill B`), it does not replace it
    assert build(["--model", "m", "--gpu-ids", "2", "--gpu-ids", "3"]).gpu_ids == [2, 3]
    assert build(["--model", "m"], {"PDSERVE_GPU_IDS": "4, 5,6"}).gpu_ids == [4, 5, 6]
    assert build(["--model", "m"], {"PDSERVE_TAGS": ""}).tags == []
    f1 = write(tmp_path, "model: m\ngpu_ids: [7, 8]\ntags: [a, b]\n", name="a.yaml")
    cfg = build(["--config", str(f1)])
    assert (cfg.gpu_ids, cfg.tags) == ([7, 8], ["a", "b"])
    f2 = write(tmp_path, "model: m\ngpu_ids: 9\ntags: solo\n", name="b.yaml")
    cfg = build(["--config", str(f2)])
    assert (cfg.gpu_ids, cfg.tags) == ([9], ["solo"])
    assert build(["--model", "m"]).gpu_ids == [0]
    with pytest.raises(ConfigError, match="PDSERVE_GPU_IDS='1,x': expected an integer"):
        build(["--model", "m"], {"PDSERVE_GPU_IDS": "1,x"})


def test_literal_choices_refused_naming_key(tmp_path: Path) -> None:
    assert build(["--model", "m", "--dtype", "float16"]).dtype == "float16"
    with pytest.raises(ConfigError, match=r"--dtype='fp8': must be one of 'auto'") as exc:
        build(["--model", "m", "--dtype", "fp8"])
    assert exc.value.key == "dtype"
    cfg_file = write(tmp_path, "model: m\ndtype: fp8\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: dtype='fp8': must be one of"):
        build(["--config", str(cfg_file)])


def test_explicit_choices_on_list() -> None:
    @dataclass(frozen=True)
    class Pick:
        colors: list[str] = option(default_factory=list, help="c", choices=["red", "blue"])

    assert build_config(Pick, ["--colors", "red", "blue"], env={}).colors == ["red", "blue"]
    with pytest.raises(ConfigError, match="--colors=.*must be one of 'red', 'blue'"):
        build_config(Pick, ["--colors", "red", "green"], env={})


def test_check_refusal_from_each_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--max-model-len='0': must be > 0") as exc:
        build(["--model", "m", "--max-model-len", "0"])
    assert exc.value.key == "max_model_len"
    with pytest.raises(ConfigError, match="PDSERVE_MAX_MODEL_LEN='-3': must be > 0"):
        build(["--model", "m"], {"PDSERVE_MAX_MODEL_LEN": "-3"})
    cfg_file = write(tmp_path, "model: m\nmax-model-len: 0\n")
    with pytest.raises(ConfigError, match="cfg.yaml: max-model-len=0: must be > 0"):
        build(["--config", str(cfg_file)])


def test_overridden_bad_value_still_refused() -> None:
    with pytest.raises(ConfigError, match="PDSERVE_MAX_MODEL_LEN='abc'"):
        build(["--model", "m", "--max-model-len", "5"], {"PDSERVE_MAX_MODEL_LEN": "abc"})


def test_unknown_yaml_key_suggests(tmp_path: Path) -> None:
    cfg_file = write(tmp_path, "model: m\nmax_modle_len: 5\n")
    with pytest.raises(ConfigError) as exc:
        build(["--config", str(cfg_file)])
    msg = str(exc.value)
    assert "cfg.yaml: unknown key 'max_modle_len'" in msg
    assert "did you mean 'max_model_len'?" in msg
    assert exc.value.key == "max_modle_len"


def test_yaml_keys_with_dashes(tmp_path: Path) -> None:
    cfg_file = write(tmp_path, "model: m\nmax-model-len: 77\nenforce-eager: yes\n")
    cfg = build(["--config", str(cfg_file)])
    assert (cfg.max_model_len, cfg.enforce_eager) == (77, True)
    dup = write(tmp_path, "max-model-len: 1\nmax_model_len: 2\n", name="dup.yaml")
    with pytest.raises(ConfigError, match="given twice"):
        build(["--config", str(dup)])


def test_bad_yaml_files(tmp_path: Path) -> None:
    invalid = write(tmp_path, "model: [unclosed\n", name="broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML") as exc:
        build(["--config", str(invalid)])
    assert exc.value.key == "config"
    top = write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        build(["--config", str(top)])
    with pytest.raises(ConfigError, match="cannot read .*missing.yaml"):
        build(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match=r"--config='x.json': .* \.yaml or \.yml"):
        build(["--config", "x.json"])
    with pytest.raises(ConfigError, match="PDSERVE_CONFIG='x.toml'"):
        build([], {"PDSERVE_CONFIG": "x.toml"})
    with pytest.raises(ConfigError, match="--config given more than once"):
        build(["--config", str(top), "--config", str(top)])
    with pytest.raises(ConfigError, match="expected a string"):
        build(["--config", str(write(tmp_path, "model: 12\n", name="n.yaml"))])


def test_unknown_env_refused_other_role_ignored() -> None:
    cfg = build(["--model", "m"], {"PDSERVE_BETA_PORT": "not-checked-here", "HOME": "/x"})
    assert cfg.model == "m"
    with pytest.raises(ConfigError) as exc:
        build(["--model", "m"], {"PDSERVE_MAX_MODLE_LEN": "5"})
    assert "unknown environment variable PDSERVE_MAX_MODLE_LEN" in str(exc.value)
    assert "did you mean 'PDSERVE_MAX_MODEL_LEN'?" in str(exc.value)
    assert exc.value.key == "PDSERVE_MAX_MODLE_LEN"
    # The other role's own variables are checked when that role builds.
    with pytest.raises(ConfigError, match="PDSERVE_BETA_PORT='x': expected an integer"):
        build_config(BetaConfig, [], env={"PDSERVE_BETA_PORT": "x"})


def test_bad_numbers_from_env() -> None:
    for text in ["abc", "12abc", "1.5", ""]:
        with pytest.raises(ConfigError, match="PDSERVE_MAX_MODEL_LEN=.*expected an integer") as e:
            build(["--model", "m"], {"PDSERVE_MAX_MODEL_LEN": text})
        assert e.value.key == "max_model_len"
    assert build(["--model", "m"], {"PDSERVE_MAX_MODEL_LEN": " 12 "}).max_model_len == 12
    with pytest.raises(ConfigError, match="PDSERVE_TEMPERATURE='hot': expected a number"):
        build(["--model", "m"], {"PDSERVE_TEMPERATURE": "hot"})


def test_yaml_int_refuses_bool_and_float(tmp_path: Path) -> None:
    for text in ["true", "1.5"]:
        path = write(tmp_path, f"model: m\nmax_model_len: {text}\n")
        with pytest.raises(ConfigError, match="max_model_len=.*expected an integer"):
            build(["--config", str(path)])


def test_missing_required_names_flag_and_env() -> None:
    with pytest.raises(ConfigError) as exc:
        build([], {})
    msg = str(exc.value)
    assert "--model" in msg and "PDSERVE_MODEL" in msg
    assert exc.value.key == "model"
    assert build([], {"PDSERVE_MODEL": "m"}).model == "m"


def test_argparse_errors_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown option '--max-modle-len'") as exc:
        build(["--model", "m", "--max-modle-len", "5"])
    assert "did you mean '--max-model-len'?" in str(exc.value)
    with pytest.raises(ConfigError, match="--max-model-len: expected one argument") as exc:
        build(["--model", "m", "--max-model-len"])
    assert exc.value.key == "max_model_len"
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        build(["--model", "m", "stray"])
    # No prefix matching: an abbreviation is an unknown flag, not a silent alias.
    with pytest.raises(ConfigError, match="unknown option '--max-model'"):
        build(["--model", "m", "--max-model", "5"])


def test_result_is_frozen_and_picklable() -> None:
    cfg = build(["--model", "m"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "other"  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg
    assert config_sources(again) == config_sources(cfg)
    with pytest.raises(ValueError, match="not made by build_config"):
        config_sources(AlphaConfig(model="x"))


def test_post_init_value_error_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match="CrossConfig: low must be <= high") as exc:
        build_config(CrossConfig, ["--low", "5"], env={})
    assert exc.value.key == ""
    assert build_config(CrossConfig, ["--high", "5", "--low", "4"], env={}).low == 4


def test_describe_masks_secret() -> None:
    cfg = build(["--model", "m", "--api-key", "sk-secret"], {"PDSERVE_MAX_MODEL_LEN": "64"})
    text = describe(cfg)
    assert "sk-secret" not in text
    assert "sk-secret" not in repr(cfg)
    lines = text.splitlines()
    assert "api_key = '***'  (flag)" not in lines  # masked value is not quoted
    assert "api_key = ***  (flag)" in lines
    assert "max_model_len = 64  (env)" in lines
    assert "model = 'm'  (flag)" in lines
    assert "served_name = None  (default)" in lines
    assert len(lines) == len(dataclasses.fields(AlphaConfig))


def test_secret_value_not_echoed_in_errors() -> None:
    @dataclass(frozen=True)
    class Secretive:
        token: str = option("", help="t", secret=True, check=lambda v: "too short")

    with pytest.raises(ConfigError) as exc:
        build_config(Secretive, ["--token", "hunter2"], env={})
    assert "hunter2" not in str(exc.value)
    assert "--token=***: too short" in str(exc.value)


def test_role_config_refuses_mutable_dataclass() -> None:
    with pytest.raises(TypeError, match="frozen"):
        role_config("test-mutable")(dataclass(type("M", (), {})))
