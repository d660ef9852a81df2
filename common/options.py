"""How a config dataclass declares its options: `option()` makes a field that carries its
flag, help, choices and check. The builder that reads flags > PDSERVE_* environment > YAML
> defaults into such a dataclass is `pdserve/config.py`; declarations live here so that
every layer (the engine's config included) can declare options without importing it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

META_KEY = "pdserve"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    secret: bool = False,
) -> Any:
    """A dataclass field with CLI/env/YAML metadata; without a default the option is required.

    `check(value)` returns an error string (e.g. "must be > 0") or None; it is not called for
    None. `secret=True` masks the value in describe(), help, error messages and repr().
    """
    if flag is not None and not flag.startswith("--"):
        raise ValueError(f"option flag {flag!r} must start with '--'")
    meta = {"help": help, "flag": flag, "choices": None if choices is None else tuple(choices),
            "check": check, "metavar": metavar, "secret": secret}
    return dataclasses.field(default=default, default_factory=default_factory, repr=not secret,
                             metadata={META_KEY: meta})
