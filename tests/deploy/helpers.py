"""Reading deploy/ the way its consumers do, without Docker or Kubernetes.

- `load_compose` parses deploy/docker-compose.yml (YAML anchors and `<<` merges resolved)
  and applies Compose's variable interpolation (`interpolate`) from a given mapping.
- `localize` is THE documented rewrite that turns a compose service's environment into one
  for a local process beside the others (see its docstring); nothing else is changed.
- `role_config` names the config class a service's command builds, and `check_env` builds
  it from the environment exactly as the process would, refusing variables that belong to
  another role (the real process would refuse them too).
- `LocalProcess` / `start_local` / `stop_all` run services as process groups and make sure
  none survives the test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE_SCHEMA = REPO.parent / "shared" / "data" / "compose-spec.json"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME, $$
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                  r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    """A `${NAME:?message}` whose variable is missing, as `docker compose` reports it."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation of one string (the forms of its spec that this file uses)."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = variables.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if missing else str(value)
        if op in ("?", ":?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        return "" if value is None else str(value)

    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, variables) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, variables) for v in node]
    return node


def load_compose_raw() -> dict[str, Any]:
    """The compose file as YAML data, before interpolation (what the schema validates)."""
    with open(COMPOSE_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_compose(variables: Mapping[str, str]) -> dict[str, Any]:
    """The compose file with every string interpolated from `variables`."""
    return _interpolate_tree(load_compose_raw(), variables)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment` (mapping or KEY=VALUE list) as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in env.items()}


def command(service: Mapping[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def local_argv(argv: list[str]) -> list[str]:
    """`pdserve ...` (the image's console script) as this interpreter's `python -m pdserve`."""
    assert argv[0] == "pdserve", f"expected a pdserve command, not {argv}"
    return [sys.executable, "-m", "pdserve", *argv[1:]]


def localize(env: Mapping[str, str], service: str,
             ports: Mapping[str, tuple[int, int]], host: str = "127.0.0.1",
             names: Mapping[str, str] | None = None) -> dict[str, str]:
    """Rewrite compose service `service`'s environment so that it runs as a local process.

    In compose every service has its own network namespace, binds every interface and
    reaches the others by service name on fixed ports; local processes share one loopback.
    `ports` maps each service to (its PDSERVE_PORT in the compose file, a free local base
    port with room for the +1/+2 ports derived from it). Exactly these rewrites happen:
      - PDSERVE_HOST=0.0.0.0 -> 127.0.0.1 (a test binds no public interface);
      - a value that is a service name, or PDSERVE_ADVERTISE_HOST=auto (the container's own
        IP) -> 127.0.0.1 (`host`);
      - in http(s)://NAME:PORT URLs, and ROLE=NAME:PORT discovery entries, of a service NAME
        -> 127.0.0.1 (`host`), and PORT is shifted by the same offset as NAME's base port
        (so 8100 -> its local base, 8101 -> base + 1);
      - every PDSERVE_*_PORT of this service is shifted by this service's offset.
    Every other variable (token, model, transports, memory, ...) passes through unchanged.
    `host`: this process's own address (a replica's loopback IP, 127.0.0.k); `names`: what a
    service name in URLs and discovery entries becomes (default 127.0.0.1; a name kept for a
    stand-in DNS, to list several replicas).
    """
    offset = {name: local - container for name, (container, local) in ports.items()}
    url = re.compile(r"(https?://|\b[a-z]+=)(" + "|".join(map(re.escape, sorted(
        ports, key=len, reverse=True))) + r"):(\d+)")
    names = names or {}

    def target(m: re.Match) -> str:
        name = m.group(2)
        return f"{m.group(1)}{names.get(name, '127.0.0.1')}:{int(m.group(3)) + offset[name]}"

    out: dict[str, str] = {}
    for key, value in env.items():
        if key == "PDSERVE_HOST" and value == "0.0.0.0":
            value = host
        elif value in ports or (key == "PDSERVE_ADVERTISE_HOST" and value == "auto"):
            value = host
        elif key.startswith("PDSERVE_") and key.endswith("_PORT") and value.isdigit():
            value = str(int(value) + offset[service])
        else:
            value = url.sub(target, value)
        out[key] = value
    return out


# ---- which config a command builds; checking an environment against it -------------------

def role_config(argv: list[str]) -> tuple[type, list[str]]:
    """(config class, extra argv) that `pdserve <subcommand>` builds."""
    from pdserve.serve import ServeConfig
    from pdserve.service.config import WorkerConfig

    sub = argv[1]
    if sub == "serve":
        return ServeConfig, []
    if sub in ("prefill", "decode"):
        return WorkerConfig, ["--role", sub]
    raise AssertionError(f"unexpected subcommand in {argv}")


def check_env(cls: type, extra_argv: list[str], env: Mapping[str, str]) -> Any:
    """Build `cls` from `env` as the process would; a PDSERVE_* variable that `cls` does
    not have is refused (the process would refuse it, or worse, ignore another role's)."""
    from pdserve.config import OTHER_ENV_VARS, build_config, env_name

    own = {env_name(f.name) for f in dataclasses.fields(cls)} | set(OTHER_ENV_VARS)
    foreign = sorted(k for k in env if k.startswith("PDSERVE_") and k not in own)
    assert not foreign, f"{cls.__name__} has no option for {foreign}"
    return build_config(cls, extra_argv, env=dict(env))


# ---- local processes -------------------------------------------------------------------

@dataclasses.dataclass
class LocalProcess:
    name: str
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def clean_base_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without PDSERVE_* / SM_* (so only the service's own count),
    with thread limits for 2-core machines, then `layers` in order (later ones win)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PDSERVE_", "SM_PDSERVE_", "SM_VLLM_"))}
    base.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "TOKENIZERS_PARALLELISM": "false"})
    for layer in layers:
        base.update(layer)
    return base


def start_local(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> LocalProcess:
    """Start argv in its own process group (so stop_all can end its children too)."""
    log = log_dir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return LocalProcess(name, proc, log, env)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_all(procs: Iterable[LocalProcess], grace: float = 20.0) -> list[str]:
    """SIGTERM each process (a graceful stop frees pool files, stops local clusters), then
    SIGKILL whatever is left of its process group. Returns the names that needed SIGKILL."""
    procs = list(procs)
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    killed = []
    for p in procs:
        try:
            p.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(p.name)
        # the group: the process itself and anything it started (a local cluster's workers)
        deadline = time.monotonic() + 10
        while group_alive(p.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(p.proc.pid):
            killed.append(p.name)
            os.killpg(p.proc.pid, signal.SIGKILL)
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait(5)
        deadline = time.monotonic() + 5  # killed orphans are reaped by init shortly
        while group_alive(p.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return killed


def run_healthcheck(service: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    """Run the service's compose healthcheck (["CMD", "python", ...]) here; True on exit 0."""
    test = list(service["healthcheck"]["test"])
    assert test[0] == "CMD", "healthchecks are exec form (the image has no shell tools)"
    argv = [sys.executable if a == "python" else a for a in test[1:]]
    return subprocess.run(argv, env=dict(env), capture_output=True, timeout=15).returncode == 0


def wait_until(pred, what: str, timeout: float, procs: Iterable[LocalProcess] = (),
               interval: float = 0.3) -> None:
    """Poll pred() until true; fail early (with logs) if one of procs exits."""
    procs = list(procs)
    end = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.proc.returncode} while waiting "
                                     f"for {what}:\n{p.tail()}")
        if pred():
            return
        if time.monotonic() > end:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval)
