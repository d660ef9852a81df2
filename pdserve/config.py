"""Configuration builder shared by every pdserve role.

This module owns the generic machinery only: each role (generate, prefill, decode, serve, ...)
declares one frozen dataclass elsewhere, with fields made by `option()` (`common/options.py`),
and builds it once with `build_config()`. Values come from, highest first: command-line flags
> `PDSERVE_*` environment variables > the YAML file named by `--config` / `PDSERVE_CONFIG` >
the dataclass defaults.
Every bad or unknown value raises `ConfigError` naming the key and where it came from, so the
caller decides how to print and exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pdserve.common.options import META_KEY, option  # noqa: F401 - option: re-exported

T = TypeVar("T")

ENV_PREFIX = "PDSERVE_"
CONFIG_ENV = "PDSERVE_CONFIG"
# PDSERVE_* variables read outside any role config (they are not typos)
OTHER_ENV_VARS = frozenset({
    CONFIG_ENV,
    "PDSERVE_CACHE_DIR",  # where the built-in model is materialised (engine/builtin_model.py)
})
_SOURCES_ATTR = "_pdserve_sources"
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_NONE_TEXT = frozenset({"", "none", "null"})
_SCALARS = (str, int, float, bool, Path)

# role name -> (config class, the env names it understands); the union tells which PDSERVE_*
# variables are typos and which merely belong to another role.
_REGISTRY: dict[str, tuple[type, frozenset[str]]] = {}


class ConfigError(ValueError):
    """A bad or unknown configuration value; the message names the key and where it came from."""

    key: str  # the option name (snake_case) or the unknown key as written

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class _Bad(Exception):
    """Internal: a conversion problem, turned into a ConfigError once the source is known."""


@dataclasses.dataclass(frozen=True)
class _Opt:
    name: str
    flag: str
    env: str
    base: type  # one of _SCALARS
    optional: bool
    is_list: bool
    choices: tuple[Any, ...] | None
    check: Callable[[Any], str | None] | None
    help: str
    metavar: str | None
    secret: bool
    field: dataclasses.Field


def env_name(field_name: str) -> str:
    """The environment variable of an option: "max_model_len" -> "PDSERVE_MAX_MODEL_LEN"."""
    return ENV_PREFIX + field_name.upper()


def _scalar_type(tp: Any, where: str) -> tuple[type, tuple[Any, ...] | None]:
    if typing.get_origin(tp) is typing.Literal:
        values = typing.get_args(tp)
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or not kinds <= {str, int}:
            raise TypeError(f"{where}: Literal values must all be str or all int")
        return kinds.pop(), values
    if tp in _SCALARS:
        return tp, None
    raise TypeError(f"{where}: unsupported option type {tp!r}")


def _options(cls: type) -> list[_Opt]:
    """Analyse a config dataclass; a TypeError here is a programming error, not bad input."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"{cls!r} is not a dataclass")
    if "__slots__" in cls.__dict__:  # config_sources() needs an attribute slot on the instance
        raise TypeError(f"{cls.__name__}: slots dataclasses are not supported")
    hints = typing.get_type_hints(cls)
    opts = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        where = f"{cls.__name__}.{f.name}"
        if f.name in ("config", "help"):
            raise TypeError(f"{where}: the name clashes with the built-in --{f.name}")
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"{where}: only `X | None` unions are supported")
            tp, optional = args[0], True
        is_list = typing.get_origin(tp) is list
        if is_list:
            tp = typing.get_args(tp)[0]
        base, literal = _scalar_type(tp, where)
        meta = f.metadata.get(META_KEY, {})
        opts.append(
            _Opt(
                name=f.name,
                flag=meta.get("flag") or "--" + f.name.replace("_", "-"),
                env=env_name(f.name),
                base=base,
                optional=optional,
                is_list=is_list,
                choices=meta.get("choices") or literal,
                check=meta.get("check"),
                help=meta.get("help", ""),
                metavar=meta.get("metavar"),
                secret=meta.get("secret", False),
                field=f,
            )
        )
    return opts


def role_config(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator registering a frozen dataclass as role `name`'s config."""

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"{cls!r}: a role config must be a @dataclass(frozen=True)")
        old = _REGISTRY.get(name)
        # Re-registering the same class (a module re-imported) is fine; two classes are not.
        if old and (old[0].__module__, old[0].__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"role {name!r} already has config {old[0].__qualname__}")
        _REGISTRY[name] = (cls, frozenset(o.env for o in _options(cls)))
        return cls

    return register


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _fmt(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _help_text(opt: _Opt) -> str:
    parts = [opt.help] if opt.help else []
    if _is_required(opt.field):
        parts.append("(required)")
    else:
        f = opt.field
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = "***" if opt.secret and default is not None else _fmt(default)
        parts.append(f"(default: {shown})")
    parts.append(f"[env: {opt.env}]")
    return " ".join(parts).replace("%", "%%")  # argparse %-formats help strings


class _ConfigAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise ConfigError("--config given more than once", key="config")
        setattr(namespace, self.dest, values)


def add_arguments(cls: type, parser: argparse.ArgumentParser) -> None:
    """Add one argument per field (+ --config) to parser; only given flags land in the namespace."""
    for opt in _options(cls):
        kw: dict[str, Any] = {
            "dest": opt.name,
            "default": argparse.SUPPRESS,
            "help": _help_text(opt),
        }
        if opt.base is bool and not opt.is_list:
            parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if opt.metavar:
            kw["metavar"] = opt.metavar
        elif opt.choices:
            kw["metavar"] = "{" + ",".join(map(str, opt.choices)) + "}"
        if opt.is_list:
            # `--x a b` and `--x a --x b` both give [a, b] (a repeated flag must not drop values)
            kw["nargs"] = "+"
            kw["action"] = "extend"
        parser.add_argument(opt.flag, **kw)
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        action=_ConfigAction,
        default=argparse.SUPPRESS,
        help=f"YAML file of options, keys as option names [env: {CONFIG_ENV}]",
    )


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting 2."""

    flag_names: dict[str, str]

    def error(self, message: str) -> typing.NoReturn:
        m = re.match(r"argument (\S+?): (.*)", message, re.S)
        if m:
            flag = m.group(1).split("/")[0]
            raise ConfigError(f"{flag}: {m.group(2)}", key=self.flag_names.get(flag, flag))
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            word = m.group(1).split("=")[0]
            if not word.startswith("-"):
                raise ConfigError(f"unexpected argument {word!r} (options take --flags)", key=word)
            raise ConfigError(
                f"unknown option {word!r}{_suggest(word, list(self.flag_names))}", key=word
            )
        raise ConfigError(message, key="")


def _scalar(base: type, v: Any) -> Any:
    if base is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        text = v.strip().lower() if isinstance(v, str) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _Bad("expected a boolean (true/false, 1/0, yes/no, on/off)")
    if base is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str):
            try:
                return int(v.strip(), 10)
            except ValueError:
                pass
        raise _Bad("expected an integer")
    if base is float:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                pass
        raise _Bad("expected a number")
    if base is Path:
        if isinstance(v, str) and v:
            return Path(v).expanduser()  # YAML and env do not expand '~' like a shell does
        raise _Bad("expected a path")
    if isinstance(v, str):
        return v
    raise _Bad("expected a string (quote it in YAML)")


def _convert(opt: _Opt, raw: Any, source: str) -> Any:
    """Turn a raw flag/env/YAML value into the field's type; raises _Bad."""
    if raw is None:
        if opt.optional:
            return None
        raise _Bad("must not be null")
    if source == "env" and opt.optional and raw.strip().lower() in _NONE_TEXT:
        return None
    if opt.is_list:
        if source == "env":
            items = [s.strip() for s in raw.split(",") if s.strip()]
        elif isinstance(raw, list):
            items = raw
        elif isinstance(raw, dict):
            raise _Bad("expected a list")
        else:
            items = [raw]
        value = [_scalar(opt.base, x) for x in items]
        todo = value
    else:
        if isinstance(raw, list | dict):
            raise _Bad("expected a single value")
        value = _scalar(opt.base, raw)
        todo = [value]
    if opt.choices:
        for x in todo:
            if x not in opt.choices:
                raise _Bad("must be one of " + ", ".join(map(repr, opt.choices)))
    problem = opt.check(value) if opt.check else None
    if problem:
        raise _Bad(problem)
    return value


def _load_yaml(path_text: str, origin: str) -> dict[str, tuple[str, Any]]:
    """Read the config file: normalized key -> (key as written, value)."""
    if Path(path_text).suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(
            f"{origin}={path_text!r}: the config file must be .yaml or .yml", key="config"
        )
    try:
        with open(path_text, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(
            f"{origin}: cannot read {path_text!r}: {e.strerror or e}", key="config"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path_text}: invalid YAML: {e}", key="config") from e
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path_text}: the top level must be a mapping of option: value, "
            f"not {type(data).__name__}",
            key="config",
        )
    out: dict[str, tuple[str, Any]] = {}
    for k, v in data.items():
        norm = str(k).replace("-", "_")
        if norm in out:
            raise ConfigError(
                f"{path_text}: key {k!r} given twice (as {out[norm][0]!r})", key=str(k)
            )
        out[norm] = (str(k), v)
    return out


def build_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """Build `cls` from argv, env, the YAML file and defaults; raises ConfigError on bad input.

    `--help` prints help and raises SystemExit(0) as argparse does.
    """
    opts = _options(cls)
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    add_arguments(cls, parser)
    parser.flag_names = {o.flag: o.name for o in opts}
    parser.flag_names.update({"--no-" + o.flag[2:]: o.name for o in opts if o.base is bool})
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    env = os.environ if env is None else env

    known_env = {*OTHER_ENV_VARS, *(o.env for o in opts)}
    for _, names in _REGISTRY.values():
        known_env |= names
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in known_env:
            raise ConfigError(
                f"unknown environment variable {var}{_suggest(var, sorted(known_env))}", key=var
            )

    file_data: dict[str, tuple[str, Any]] = {}
    path = ns.get("config") or env.get(CONFIG_ENV) or None
    if path:
        origin = "--config" if "config" in ns else CONFIG_ENV
        file_data = _load_yaml(path, origin)
        names = [o.name for o in opts]
        for norm, (written, _) in file_data.items():
            if norm not in names:
                raise ConfigError(
                    f"{path}: unknown key {written!r}{_suggest(norm, names)}", key=written
                )

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in opts:
        # Every given value is converted and checked, even one a higher source overrides:
        # a stale bad value should fail loudly rather than lurk until the override goes away.
        given: list[tuple[str, str, Any]] = []
        if opt.name in ns:
            given.append(("flag", opt.flag, ns[opt.name]))
        if opt.env in env:
            given.append(("env", opt.env, env[opt.env]))
        if opt.name in file_data:
            written, raw = file_data[opt.name]
            given.append(("file", f"{path}: {written}", raw))
        found = []
        for source, label, raw in given:
            try:
                found.append((source, _convert(opt, raw, source)))
            except _Bad as e:
                shown = "***" if opt.secret else repr(raw)
                raise ConfigError(f"{label}={shown}: {e}", key=opt.name) from None
        if found:
            sources[opt.name], values[opt.name] = found[0]
        elif _is_required(opt.field):
            raise ConfigError(
                f"missing required option {opt.flag} (or env {opt.env}, or key "
                f"{opt.name!r} in the --config file)",
                key=opt.name,
            )
        else:
            sources[opt.name] = "default"

    try:
        cfg = cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # a __post_init__ cross-field check
        raise ConfigError(f"{cls.__name__}: {e}", key="") from e
    # A tuple of pairs: the instance stays frozen, picklable and field-hashable.
    object.__setattr__(cfg, _SOURCES_ATTR, tuple(sources.items()))
    return cfg


def config_sources(cfg: Any) -> dict[str, str]:
    """Field name -> 'flag' | 'env' | 'file' | 'default' for a config made by build_config."""
    pairs = getattr(cfg, _SOURCES_ATTR, None)
    if pairs is None:
        raise ValueError(f"{type(cfg).__name__} instance was not made by build_config()")
    return dict(pairs)


def describe(cfg: Any) -> str:
    """One line per option, "name = value  (source)", with secret values shown as '***'."""
    sources = dict(getattr(cfg, _SOURCES_ATTR, ()))
    lines = []
    for opt in _options(type(cfg)):
        value = getattr(cfg, opt.name)
        shown = "***" if opt.secret and value is not None else _fmt(value)
        src = sources.get(opt.name)
        lines.append(f"{opt.name} = {shown}" + (f"  ({src})" if src else ""))
    return "\n".join(lines)
