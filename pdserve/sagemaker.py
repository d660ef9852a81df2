"""`pdserve sagemaker`: SageMaker-style configuration by environment, then `pdserve serve`.

Amazon SageMaker runs a container as `docker run IMAGE serve`, sends traffic to port 8080
(`GET /ping`, `POST /invocations`) and configures it only through environment variables.
vLLM's `sagemaker-entrypoint.sh` turns every `SM_VLLM_<NAME>=value` into `--name value`;
this module does the same for pdserve so that such a setup moves over unchanged:

- `SM_PDSERVE_<NAME>=value` -> `--name value`: prefix stripped, lowercased, `_` -> `-`.
  An empty value gives a bare flag (`SM_PDSERVE_ENABLE_PREFIX_CACHING=` ->
  `--enable-prefix-caching`); a boolean option also takes true/false (`false` ->
  `--no-enable-prefix-caching`); a list option takes a comma-separated list, like its
  `PDSERVE_*` variable (`SM_PDSERVE_API_KEY=k1,k2` -> `--api-key k1 k2`). A name that is not
  a `pdserve serve` option is refused, naming the variable.
- `SM_VLLM_<NAME>=value`: the same translation, for the options pdserve shares with vLLM
  (`--model`, `--port`, `--max-model-len`, `--max-num-seqs`, `--gpu-memory-utilization`,
  `--dtype` with vLLM's `half`/`float` aliases, `--api-key`, `--served-model-name`, ...).
  vLLM-only options are dropped with one warning that names each of them and why
  (`--trust-remote-code`, `--disable-log-requests`, `--disable-log-stats`, `--swap-space`,
  ...: see `VLLM_DROPPED`; any other unknown name is dropped as "not a pdserve option").
  Which options are shared is read from `ServeConfig` itself, so an option pdserve gains
  (e.g. `--enforce-eager`) is passed on from then on: `SM_VLLM_TENSOR_PARALLEL_SIZE=2` is
  `--tensor-parallel-size 2`, each local worker sharded over 2 ranks (CPU workers; on GPUs
  `pdserve serve` refuses tp > 1 with the reason before starting any worker). Options whose
  silent loss would change what is served are refused: `--pipeline-parallel-size`,
  `--data-parallel-size` unless 1 (then they are no-ops) and `--quantization` unless
  empty/none.
- `--host 0.0.0.0 --port 8080` come first (`$SAGEMAKER_BIND_TO_PORT` replaces 8080 where
  SageMaker sets it), then the `SM_VLLM_*` flags, then the `SM_PDSERVE_*` flags, each group
  sorted by name, then any arguments given to `pdserve sagemaker` itself: as with vLLM's
  script, the last value of an option wins (so `SM_PDSERVE_PORT` overrides 8080).

`sagemaker_args(environ)` is the pure core (tests call it). `main` then execs
`python -m pdserve serve` with those flags, so the process SageMaker started becomes the
proxy. Secret options (`--api-key`, `--internal-token`) travel to it in `PDSERVE_*`
environment variables rather than argv, where every process of the host could read them.
With no worker URLs, `pdserve serve` starts a local cluster (1 P + 1 D) in the container,
with a random internal token of its own. An API key guards /invocations too, and
SageMaker's InvokeEndpoint sends no Authorization header: `main` warns when one is set.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import shlex
import sys
import types
import typing
from collections.abc import Mapping, Sequence

from pdserve.config import CONFIG_ENV, ConfigError, env_name

logger = logging.getLogger("pdserve.sagemaker")

SAGEMAKER_PORT = 8080
SAGEMAKER_HOST = "0.0.0.0"
PORT_ENV = "SAGEMAKER_BIND_TO_PORT"  # set by SageMaker for multi-container endpoints
VLLM_PREFIX = "SM_VLLM_"
PDSERVE_PREFIX = "SM_PDSERVE_"

# vLLM options pdserve has no equivalent for: dropped with a warning naming each one.
# Any other vLLM-only option is dropped the same way ("not a pdserve option").
VLLM_DROPPED: dict[str, str] = {
    "max-seq-len-to-capture": "pdserve sizes its CUDA graphs itself",
    "compilation-config": "pdserve does not use torch.compile",
    "enable-chunked-prefill": "pdserve always chunks long prompts (--max-num-batched-tokens)",
    "no-enable-chunked-prefill": "pdserve always chunks long prompts",
    "trust-remote-code": "pdserve runs no checkpoint code (Llama-family models only)",
    "disable-log-requests": "pdserve does not log request contents",
    "enable-log-requests": "pdserve does not log request contents",
    "disable-log-stats": "use SM_PDSERVE_STATS_INTERVAL=0",
    "uvicorn-log-level": "use SM_PDSERVE_LOG_LEVEL",
    "disable-frontend-multiprocessing": "use SM_PDSERVE_API_SERVER_COUNT",
    "disable-custom-all-reduce": "pdserve runs no all-reduce",
    "distributed-executor-backend": "pdserve runs one engine per worker process",
    "swap-space": "preempted sequences are recomputed, never swapped",
    "kv-cache-dtype": "the KV cache uses the model's dtype",
    "tokenizer-mode": "the checkpoint's tokenizer.json is used",
    "download-dir": "pdserve never downloads (the model is a local directory)",
    "revision": "pdserve never downloads (the model is a local directory)",
    "enable-server-load-tracking": "load tracking is always on (/load, endpoint-load-metrics)",
    "disable-fastapi-docs": "the proxy serves no API docs",
    "max-log-len": "pdserve does not log request contents",
}
# vLLM options that are no-ops at 1 and refused otherwise ({local_devices}, {num_engines},
# {tensor_parallel}: the option names of the form the user configures).
# --tensor-parallel-size is not one: serve has it, so it passes through as shared options do.
VLLM_ONLY_ONE: dict[str, str] = {
    "pipeline-parallel-size": "pdserve does not shard a model by layers; use "
    "{tensor_parallel} (ranks over heads), or give each worker its own GPU ({local_devices})",
    "data-parallel-size": "use {num_engines} for more engines",
}
SM_NAMES = {"local_devices": "SM_PDSERVE_LOCAL_DEVICES",
            "tensor_parallel": "SM_VLLM_TENSOR_PARALLEL_SIZE",
            "num_engines": "SM_PDSERVE_NUM_PREFILL / SM_PDSERVE_NUM_DECODE"}
# vLLM options refused unless empty or "none": dropping them would load the model wrongly
VLLM_ONLY_NONE: dict[str, str] = {
    "quantization": "pdserve loads unquantized checkpoints only",
}
# vLLM spellings of values pdserve names differently
VLLM_VALUE_ALIASES: dict[str, dict[str, str]] = {
    "dtype": {"half": "float16", "float": "float32"},
}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclasses.dataclass(frozen=True)
class _ServeOption:
    flag: str
    kind: str  # "bool" | "list" | "value"
    secret: bool
    env: str


def serve_options() -> dict[str, _ServeOption]:
    """`pdserve serve`'s options by flag name without dashes ("max-model-len")."""
    from pdserve.serve import ServeConfig

    hints = typing.get_type_hints(ServeConfig)
    out: dict[str, _ServeOption] = {}
    for f in dataclasses.fields(ServeConfig):
        meta = f.metadata.get("pdserve", {})
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        kind = "bool" if tp is bool else "list" if typing.get_origin(tp) is list else "value"
        out[flag[2:]] = _ServeOption(flag, kind, bool(meta.get("secret")), env_name(f.name))
    out["config"] = _ServeOption("--config", "value", False, CONFIG_ENV)  # every role has it
    return out


def _flag_name(var: str, prefix: str) -> str:
    return var[len(prefix):].lower().replace("_", "-")


def _translate(var: str, name: str, value: str, opts: Mapping[str, _ServeOption]) -> list[str]:
    """One option (name without dashes, known to `opts` or as `no-<bool>`) -> its flag words."""
    negated = name.startswith("no-") and name[3:] in opts and opts[name[3:]].kind == "bool"
    opt = opts[name[3:]] if negated else opts[name]
    text = value.strip()
    if opt.kind == "bool":
        if text == "":
            return [f"--{name}"]
        low = text.lower()
        if low not in _TRUE | _FALSE:
            raise ConfigError(f"{var}={value!r}: expected empty (a bare flag) or true/false",
                              var)
        on = (low in _TRUE) != negated
        return [opt.flag if on else "--no-" + opt.flag[2:]]
    if text == "":
        raise ConfigError(f"{var} is empty: {opt.flag} needs a value", var)
    if opt.kind == "list":
        items = [s.strip() for s in value.split(",") if s.strip()]
        return [opt.flag, *items]
    return [opt.flag, value]


def _known(name: str, opts: Mapping[str, _ServeOption]) -> bool:
    return name in opts or (name.startswith("no-") and opts.get(name[3:]) is not None
                            and opts[name[3:]].kind == "bool")


@dataclasses.dataclass(frozen=True)
class Translation:
    """What the environment says: serve's flags, and the vLLM options dropped (flag, why)."""

    args: list[str]
    dropped: list[tuple[str, str]]


def translate(environ: Mapping[str, str]) -> Translation:
    """The pure translation; raises ConfigError naming the variable on a refused option."""
    opts = serve_options()
    port = environ.get(PORT_ENV) or str(SAGEMAKER_PORT)
    args = ["--host", SAGEMAKER_HOST, "--port", port]
    dropped: list[tuple[str, str]] = []
    for var in sorted(k for k in environ if k.startswith(VLLM_PREFIX)):
        name, value = _flag_name(var, VLLM_PREFIX), environ[var]
        if name in VLLM_ONLY_ONE:
            if value.strip() not in ("", "1"):
                raise ConfigError(f"{var}={value!r}: "
                                  + VLLM_ONLY_ONE[name].format(**SM_NAMES), var)
            continue  # 1 is what pdserve does anyway
        if name in VLLM_ONLY_NONE:
            if value.strip().lower() not in ("", "none"):
                raise ConfigError(f"{var}={value!r}: {VLLM_ONLY_NONE[name]}", var)
            continue
        if not _known(name, opts):
            dropped.append((f"--{name}", VLLM_DROPPED.get(name, "not a pdserve option")))
            continue
        value = VLLM_VALUE_ALIASES.get(name, {}).get(value.strip().lower(), value)
        args += _translate(var, name, value, opts)
    for var in sorted(k for k in environ if k.startswith(PDSERVE_PREFIX)):
        name = _flag_name(var, PDSERVE_PREFIX)
        if not _known(name, opts):
            close = difflib.get_close_matches(name, list(opts), n=1)
            hint = f" (did you mean {PDSERVE_PREFIX}{close[0].upper().replace('-', '_')}?)" \
                if close else ""
            raise ConfigError(f"{var}: --{name} is not a `pdserve serve` option{hint}", var)
        args += _translate(var, name, environ[var], opts)
    return Translation(args, dropped)


def sagemaker_args(environ: Mapping[str, str]) -> list[str]:
    """`pdserve serve` arguments for a SageMaker-style environment (see the module doc).

    Logs one warning naming the vLLM options it dropped; raises ConfigError on a refused one.
    """
    t = translate(environ)
    if t.dropped:
        logger.warning("ignoring vLLM option(s) pdserve does not have: %s",
                       "; ".join(f"{flag} ({why})" for flag, why in t.dropped))
    return t.args


def secrets_to_env(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Move secret options out of argv: (the other args, {PDSERVE_<NAME>: value}).

    A later occurrence of a flag replaces an earlier one, as it would on the command line.
    """
    secret = {o.flag: o for o in serve_options().values() if o.secret}
    rest: list[str] = []
    env: dict[str, str] = {}
    i = 0
    while i < len(args):
        opt = secret.get(args[i])
        if opt is None:
            rest.append(args[i])
            i += 1
            continue
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        values = list(args[i + 1:j])
        if opt.kind != "list" and len(values) != 1:
            raise ConfigError(f"{opt.flag} takes one value", opt.flag)
        if any("," in v for v in values):
            raise ConfigError(f"{opt.flag}: a value with a comma cannot be passed safely", opt.flag)
        env[opt.env] = ",".join(values)
        i = j
    return rest, env


def masked(args: Sequence[str]) -> list[str]:
    """args with the values of secret options shown as ***."""
    secret = {o.flag for o in serve_options().values() if o.secret}
    out, hide = [], False
    for a in args:
        if a.startswith("--"):
            hide = a in secret
            out.append(a)
        else:
            out.append("***" if hide else a)
    return out


USAGE = """usage: pdserve sagemaker [--dry-run] [serve options ...]

Run `pdserve serve` configured SageMaker-style: SM_PDSERVE_<NAME>=value and SM_VLLM_<NAME>=value
become --name value (empty value: bare flag), after --host 0.0.0.0 --port 8080
($SAGEMAKER_BIND_TO_PORT if set). vLLM-only options are dropped with a warning; tensor/
pipeline/data parallel sizes other than 1 and quantization are refused. Arguments given here
come last (they win). A leading `serve` (SageMaker's `docker run IMAGE serve`) is ignored.

  --dry-run   print the `pdserve serve` command (secrets masked) and exit
"""


def main(argv: Sequence[str]) -> int:
    """`pdserve sagemaker`: translate the environment and exec `pdserve serve`."""
    argv = list(argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sagemaker_args(os.environ) + argv
    rest, secret_env = secrets_to_env(args)
    if secret_env.get(env_name("api_key")) or os.environ.get(env_name("api_key")):
        logger.warning("an API key is set: /invocations needs 'Authorization: Bearer <key>', "
                       "which SageMaker's InvokeEndpoint does not send (every invocation "
                       "would answer 401); behind SageMaker, IAM guards the endpoint")
    if dry_run:
        print(shlex.join(["pdserve", "serve", *masked(args)]))
        return 0
    logger.info("exec: pdserve serve %s", shlex.join(masked(args)))
    for h in logging.getLogger().handlers:
        h.flush()
    cmd = [sys.executable, "-m", "pdserve", "serve", *rest]
    os.execve(sys.executable, cmd, {**os.environ, **secret_env})
    return 0  # not reached
