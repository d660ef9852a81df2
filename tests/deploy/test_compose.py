"""deploy/docker-compose.yml without a Docker engine: it validates against the Compose
Specification's JSON Schema, every service's environment builds its role's config, and the
GPU services keep what CUDA IPC between two containers needs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from pdserve.config import build_config
from tests.deploy.helpers import (
    COMPOSE_SCHEMA,
    InterpolationError,
    check_env,
    command,
    environment,
    interpolate,
    load_compose,
    load_compose_raw,
    localize,
    role_config,
)

pytestmark = pytest.mark.timeout(60)

VARIABLES = {"PDSERVE_INTERNAL_TOKEN": "t0ken"}
GPU = {"proxy", "prefill", "decode"}
CPU = {"proxy-cpu", "prefill-cpu", "decode-cpu"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(VARIABLES)


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    if not COMPOSE_SCHEMA.exists():
        pytest.skip(f"the Compose Specification schema is not at {COMPOSE_SCHEMA} (CI has "
                    "../shared/data beside the checkout)")
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["$schema"].rstrip("#").endswith("draft-07/schema")
    validator = jsonschema.Draft7Validator(schema)
    raw = load_compose_raw()
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # interpolated, as `docker compose config` would see it, it still validates
    assert not list(validator.iter_errors(load_compose(VARIABLES)))
    # and the validator does catch a broken file
    broken = load_compose_raw()
    broken["services"]["decode"]["ipc"] = ["not", "a", "string"]
    assert list(validator.iter_errors(broken))


def test_services_profiles_and_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == GPU | CPU
    for name, svc in services.items():
        assert svc["profiles"] == (["cpu"] if name in CPU else ["gpu"]), name
        role = name.removesuffix("-cpu")
        assert command(svc) == ["pdserve", "serve" if role == "proxy" else role], name
        # environment only: no flags on the command line
        assert all(not w.startswith("-") for w in command(svc)), name


def test_the_internal_token_is_required_and_shared() -> None:
    with pytest.raises(InterpolationError, match="PDSERVE_INTERNAL_TOKEN"):
        load_compose({})
    services = load_compose(VARIABLES)["services"]
    assert {environment(s)["PDSERVE_INTERNAL_TOKEN"] for s in services.values()} == {"t0ken"}


@pytest.mark.parametrize("name", sorted(GPU | CPU))
def test_each_environment_builds_its_roles_config(compose: dict[str, Any], name: str) -> None:
    """What the container's process would do with its environment (GPU services too: the
    config is built, not the engine)."""
    svc = compose["services"][name]
    cls, argv = role_config(command(svc))
    cfg = check_env(cls, argv, environment(svc))
    assert cfg.host == "0.0.0.0"
    if name.startswith("proxy"):
        # the proxy finds the workers by their services' DNS names (every replica), each on
        # the service's HTTP port; no fixed URL list (it would not follow --scale)
        assert not (cfg.prefill or cfg.decode or cfg.worker)
        from pdserve.serve import parse_discover

        found = [parse_discover(e) for e in cfg.discover]
        assert sorted(role for role, _, _ in found) == ["decode", "prefill"]
        for role, host, port in found:
            svc = compose["services"][host]
            assert command(svc)[-1] == role
            assert port == int(environment(svc)["PDSERVE_PORT"])
    else:
        # each replica advertises its own IP (the service name would reach any replica)
        assert cfg.advertise_host == "auto"
        assert cfg.kv_transports if cfg.role == "decode" else True
        assert "container_name" not in svc and "ports" not in svc  # it can be scaled


def test_healthchecks_probe_health_on_the_services_own_port(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name  # the CPU image has no curl
        assert "/health" in test[3] and "PDSERVE_PORT" in test[3], name
        assert "$" not in json.dumps(load_compose_raw()["services"][name]["healthcheck"]), name


def test_proxy_waits_for_healthy_workers(compose: dict[str, Any]) -> None:
    for proxy, sfx in (("proxy", ""), ("proxy-cpu", "-cpu")):
        deps = compose["services"][proxy]["depends_on"]
        assert deps == {f"prefill{sfx}": {"condition": "service_healthy"},
                        f"decode{sfx}": {"condition": "service_healthy"}}


# ---- CUDA IPC between the prefill and decode containers ----------------------------------

def _gpu_ids(svc: dict[str, Any]) -> list[str]:
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert len(nvidia) == 1 and "gpu" in nvidia[0]["capabilities"]
    return [str(i) for i in nvidia[0]["device_ids"]]


def _bytes(size: str | int) -> int:
    """Compose's byte sizes: 1073741824, "512m", "8gb", "1g"."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).strip().lower())
    assert m, f"not a size: {size!r}"
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)])


def _shares(p: dict[str, Any], d: dict[str, Any], key: str, p_name: str) -> bool:
    """P and D are in one namespace of kind `key` (pid or ipc)."""
    pv, dv = p.get(key), d.get(key)
    if pv == "host" and dv == "host":
        return True
    if dv == f"service:{p_name}":
        return key == "pid" or pv == "shareable"
    return False


@pytest.mark.parametrize("sfx", ["", "-cpu"])
def test_prefill_and_decode_share_pid_and_ipc_namespaces_and_shm(compose: dict[str, Any],
                                                                 sfx: str) -> None:
    """CUDA IPC across containers needs one PID namespace; the shm transport needs one
    /dev/shm (IPC namespace) of a useful size and, since pool files are swept by owner pid,
    the PID namespace too. Both profiles keep them."""
    p, d = compose["services"][f"prefill{sfx}"], compose["services"][f"decode{sfx}"]
    assert _shares(p, d, "pid", f"prefill{sfx}"), "P and D need one PID namespace"
    assert _shares(p, d, "ipc", f"prefill{sfx}"), "P and D need one IPC namespace (/dev/shm)"
    if p.get("ipc") != "host":  # with ipc: host /dev/shm is the host's; otherwise set its size
        owner = p if p.get("ipc") == "shareable" else d
        assert owner.get("shm_size"), "the IPC namespace's owner needs shm_size"
        kv = int(environment(p).get("PDSERVE_KV_CACHE_MEMORY_BYTES") or 0)
        assert _bytes(owner["shm_size"]) > kv, "shm_size does not hold P's KV pool file"


def test_decode_sees_prefills_gpu_and_uses_cuda_ipc(compose: dict[str, Any]) -> None:
    p, d = compose["services"]["prefill"], compose["services"]["decode"]
    p_ids, d_ids = _gpu_ids(p), _gpu_ids(d)
    assert set(p_ids) <= set(d_ids), "D must reserve P's GPU too (CUDA IPC maps P's pool)"
    assert len(d_ids) > len(p_ids), "D needs a GPU of its own besides P's"
    # each engine on its own GPU: device indexes count the container's GPUs in id order
    p_dev, d_dev = int(environment(p)["PDSERVE_DEVICE"]), int(environment(d)["PDSERVE_DEVICE"])
    assert sorted(d_ids, key=int)[d_dev] not in p_ids, "D would run on P's GPU"
    assert sorted(p_ids, key=int)[p_dev] in p_ids
    transports = environment(d).get("PDSERVE_KV_TRANSPORTS")
    cfg = build_config(role_config(command(d))[0], ["--role", "decode"],
                       env={"PDSERVE_KV_TRANSPORTS": transports} if transports is not None else {})
    assert cfg.kv_transports[0] == "cuda_ipc", "D must accept (and prefer) cuda_ipc"
    assert "tcp" in cfg.kv_transports, "keep tcp as the fallback when CUDA IPC is refused"
    assert "deploy" not in compose["services"]["proxy"], "the proxy needs no GPU"


def test_cpu_profile_runs_the_builtin_model_on_the_cpu_image(compose: dict[str, Any]) -> None:
    for name in CPU:
        svc = compose["services"][name]
        env = environment(svc)
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.cpu" and "deploy" not in svc
        assert env["PDSERVE_MODEL"] == ""  # empty: the built-in model
        if not name.startswith("proxy"):
            assert env["PDSERVE_DEVICE"] == "cpu"
    assert "shm" in environment(compose["services"]["decode-cpu"])["PDSERVE_KV_TRANSPORTS"]


# ---- the helpers the local-process test relies on ----------------------------------------

def test_interpolation_follows_compose() -> None:
    v = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET}-${UNSET:-d}-${EMPTY:-e}-${EMPTY-f}-$$-${SET:?m}", v) == "x-d-e--$-x"
    with pytest.raises(InterpolationError, match="EMPTY"):
        interpolate("${EMPTY:?say why}", v)


def test_localize_rewrites_hosts_and_ports_only() -> None:
    ports = {"prefill-cpu": (8100, 20000), "decode-cpu": (8200, 21000), "proxy-cpu": (8000, 22000)}
    env = {"PDSERVE_HOST": "0.0.0.0", "PDSERVE_PORT": "8200", "PDSERVE_KV_PORT": "8202",
           "PDSERVE_ADVERTISE_HOST": "decode-cpu", "PDSERVE_INTERNAL_TOKEN": "t",
           "PDSERVE_KV_TRANSPORTS": "shm,tcp"}
    assert localize(env, "decode-cpu", ports) == {
        **env, "PDSERVE_HOST": "127.0.0.1", "PDSERVE_PORT": "21000", "PDSERVE_KV_PORT": "21002",
        "PDSERVE_ADVERTISE_HOST": "127.0.0.1"}
    proxy = {"PDSERVE_PREFILL": "http://prefill-cpu:8100,http://prefill-cpu:8101",
             "PDSERVE_DECODE": "http://decode-cpu:8200", "PDSERVE_PORT": "8000",
             "PDSERVE_DISCOVER": "prefill=prefill-cpu:8100,decode=decode-cpu:8200"}
    assert localize(proxy, "proxy-cpu", ports) == {
        "PDSERVE_PREFILL": "http://127.0.0.1:20000,http://127.0.0.1:20001",
        "PDSERVE_DECODE": "http://127.0.0.1:21000", "PDSERVE_PORT": "22000",
        "PDSERVE_DISCOVER": "prefill=127.0.0.1:20000,decode=127.0.0.1:21000"}
    # a replica: its own loopback address; names kept for a stand-in DNS
    assert localize({**env, "PDSERVE_ADVERTISE_HOST": "auto"}, "decode-cpu", ports,
                    host="127.0.0.3")["PDSERVE_ADVERTISE_HOST"] == "127.0.0.3"
    assert localize(proxy, "proxy-cpu", ports, names={"decode-cpu": "decode-cpu"})[
        "PDSERVE_DISCOVER"] == "prefill=127.0.0.1:20000,decode=decode-cpu:21000"


@pytest.mark.parametrize("size", [None, "2"])
def test_cpu_workers_take_the_tensor_parallel_size_from_the_env_file(size: str | None) -> None:
    variables = {**VARIABLES, **({"PDSERVE_TENSOR_PARALLEL_SIZE": size} if size else {})}
    services = load_compose(variables)["services"]
    for name in ("prefill-cpu", "decode-cpu"):
        svc = services[name]
        cfg = check_env(*role_config(command(svc)), environment(svc))
        assert cfg.tensor_parallel_size == int(size or 1)
    for name in ("prefill", "decode"):  # GPU workers: one GPU each (they do not shard yet)
        assert "PDSERVE_TENSOR_PARALLEL_SIZE" not in environment(services[name])
