"""The rest of deploy/ checked against the product: Dockerfiles copy what pyproject installs,
the SageMaker entrypoint runs, the systemd units and their env files and the Kubernetes
manifests configure each role with variables its config accepts, the probes hit real
endpoints, and the Prometheus config and Grafana dashboard name metrics (and labels) that
the proxy and workers really export."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, REPO, check_env, command, environment, load_compose, role_config

pytestmark = pytest.mark.timeout(60)


# ---- Dockerfiles and the SageMaker entrypoint --------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_copy_what_pyproject_installs(name: str) -> None:
    ins = _instructions(DEPLOY / name)
    copied = {rest.split()[0].rstrip("/") for word, rest in ins if word == "COPY"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied, f"{name} misses {package_dirs - copied}"
    assert {"pyproject.toml", "deploy/sagemaker-entrypoint.sh"} <= copied
    readme = pyproject["project"]["readme"]
    assert any(readme in rest.split() for word, rest in ins if word == "COPY")
    for src in copied:  # every COPY source exists in the build context (the repo root)
        assert (REPO / src).exists(), src
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    # the CUDA image names the gpu extra (triton); the CPU image goes without it
    assert ('pip install ".[gpu]"' if name == "Dockerfile" else "pip install . ") in runs
    assert any(w == "USER" for w, _ in ins), "run as a non-root user"


def test_cuda_image_and_cpu_image_bases() -> None:
    cuda = _instructions(DEPLOY / "Dockerfile")
    assert any(w == "FROM" and r.startswith("nvidia/cuda:") for w, r in cuda)
    runs = " ".join(r for w, r in cuda if w in ("RUN", "ARG"))
    assert "python3.12" in runs and "cupy-cuda" in runs and "download.pytorch.org/whl/cu" in runs
    targets = {r.split(" AS ")[-1] for w, r in cuda if w == "FROM"}
    assert {"sagemaker", "runtime"} <= targets
    assert cuda[-1][0] == "CMD" and any(w == "FROM" and r.endswith("AS runtime") for w, r in cuda)
    assert 'ENTRYPOINT ["/usr/local/bin/sagemaker-entrypoint.sh"]' in " ".join(
        f"{w} {r}" for w, r in cuda)
    cpu = _instructions(DEPLOY / "Dockerfile.cpu")
    assert cpu[0] == ("FROM", "python:3.11-slim")
    text = (DEPLOY / "Dockerfile.cpu").read_text()
    assert "TORCH_VERSION=2.13.0" in text and "download.pytorch.org/whl/cpu" in text


def test_compose_builds_the_images_that_exist() -> None:
    compose = load_compose({"PDSERVE_INTERNAL_TOKEN": "t"})
    for name, svc in compose["services"].items():
        assert svc["build"]["context"] == ".."
        assert (DEPLOY / ".." / svc["build"]["dockerfile"]).resolve().exists(), name


def test_sagemaker_entrypoint_script_runs_pdserve_sagemaker() -> None:
    script = DEPLOY / "sagemaker-entrypoint.sh"
    assert os.access(script, os.X_OK)
    assert 'exec pdserve sagemaker "$@"' in script.read_text()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "SM_VLLM_MAX_MODEL_LEN": "256",
           "SM_PDSERVE_API_KEY": "sk-x"}
    out = subprocess.run(["sh", str(script), "serve", "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pdserve", "serve", "--host", "0.0.0.0", "--port", "8080",
                                  "--max-model-len", "256", "--api-key", "'***'"]


# ---- systemd --------------------------------------------------------------------------------

def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} outside a section"
        current.setdefault(key, []).append(value)
    return sections


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.parametrize("role", ["proxy", "prefill", "decode"])
def test_systemd_units_run_the_role_configured_by_env_files(role: str) -> None:
    unit = _unit(DEPLOY / f"pdserve-{role}.service")
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"][0])
    assert Path(argv[0]).name == "pdserve"
    assert argv[1:] == ["serve" if role == "proxy" else role], "environment only: no flags"
    files = svc["EnvironmentFile"]
    assert files == ["/etc/pdserve/common.env", f"/etc/pdserve/{role}.env"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    env = {}
    for f in files:  # the shipped examples of those files
        env.update(_env_file(DEPLOY / "systemd-env" / Path(f).name))
    for assignment in " ".join(svc.get("Environment", [])).split():
        key, _, value = assignment.partition("=")
        env[key] = value
    cls, extra = role_config(["pdserve", argv[1]])
    check_env(cls, extra, {k: v for k, v in env.items() if k.startswith("PDSERVE_")})
    # no value to copy as it is: empty, so an unedited file is refused at start
    assert env["PDSERVE_INTERNAL_TOKEN"] == ""
    if role != "proxy":  # P and D share GPUs, /dev/shm and pids on one host
        for forbidden in ("PrivateIPC", "PrivateDevices", "PrivatePIDs"):
            assert forbidden not in svc, f"{forbidden} breaks CUDA IPC / shm between P and D"
        assert "CUDA_VISIBLE_DEVICES" not in env


def test_systemd_proxy_points_at_the_workers_ports() -> None:
    proxy = _env_file(DEPLOY / "systemd-env" / "proxy.env")
    assert proxy["PDSERVE_PREFILL"].endswith(":" + _env_file(
        DEPLOY / "systemd-env" / "prefill.env")["PDSERVE_PORT"])
    assert proxy["PDSERVE_DECODE"].endswith(":" + _env_file(
        DEPLOY / "systemd-env" / "decode.env")["PDSERVE_PORT"])


# ---- Kubernetes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for res in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / res).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


# the Secret an operator creates, as the kustomization's comment says (none is shipped)
SECRET_NAME = "pdserve-secrets"
SECRET = {"internal-token": "3f9a0c1e7b5d2468ace0bdf13579ace0", "api-key": "sk-k8s-test"}


def _k8s_env(c: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    env = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME
            # only the API key may be absent (no key); a pod never starts without the token
            assert ref.get("optional", False) == (ref["key"] == "api-key"), ref
            if ref["key"] in secret:
                env[e["name"]] = secret[ref["key"]]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[e["name"]] = "10.0.0.7"
    return env


@pytest.mark.parametrize("role", ["proxy", "prefill", "decode"])
def test_k8s_deployment_and_service(k8s: dict, role: str) -> None:
    dep = k8s[("Deployment", f"pdserve-{role}")]
    svc = k8s[("Service", f"pdserve-{role}")]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    c = _container(dep)
    assert c["command"] == ["pdserve", "serve" if role == "proxy" else role]
    env = _k8s_env(c, SECRET)
    cls, extra = role_config(c["command"])
    cfg = check_env(cls, extra, env)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == cfg.port
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports and ports[p["targetPort"]] == p["port"]
    # probes: readiness on /health; liveness on a route that answers while the process lives
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    live = c["livenessProbe"]["httpGet"]
    assert live == {"path": "/health" if role != "proxy" else "/version", "port": "http"}
    assert c["startupProbe"]["httpGet"]["port"] == "http"
    # Prometheus finds the pod's /metrics
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == ports["http"]
    res = c["resources"]
    if role == "proxy":
        assert "nvidia.com/gpu" not in res.get("limits", {})
        assert cfg.discover == ["prefill=pdserve-prefill-pods:8100",
                                "decode=pdserve-decode-pods:8200"]
        assert "PDSERVE_PREFILL" not in env and "PDSERVE_DECODE" not in env
        assert "PDSERVE_API_KEY" in env
    else:
        assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
        assert cfg.host == "0.0.0.0" and cfg.advertise_host == "10.0.0.7"
        assert dep["spec"]["replicas"] >= 1  # the proxy follows the pods (discovery)
        # SIGTERM drains the pod: within its grace period
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert cfg.drain_timeout < grace
    if role == "decode":  # pods share no GPU or namespaces: KV over TCP, on the kv port
        assert cfg.kv_transports == ["tcp"]
        assert ports["kv"] == cfg.kv_address_port and ports["data"] == cfg.data_address_port
    assert env["PDSERVE_INTERNAL_TOKEN"] == SECRET["internal-token"]
    if role == "proxy":  # a Secret without api-key: the proxy starts with no key
        assert "PDSERVE_API_KEY" not in _k8s_env(c, {"internal-token": "x" * 32})


def test_k8s_ships_no_secret_with_a_placeholder_token(k8s: dict) -> None:
    """`kubectl apply -k` must never write a placeholder over the token an operator created:
    the Secret is theirs to create (`kubectl create secret`, as the kustomization says)."""
    assert not [key for key in k8s if key[0] == "Secret"]
    text = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    assert f"create secret generic {SECRET_NAME}" in text
    assert '--from-literal=internal-token="$(openssl rand -hex 16)"' in text


def test_k8s_proxy_discovers_the_worker_pods_by_headless_services(k8s: dict) -> None:
    """PDSERVE_DISCOVER names, per role, a headless Service (its DNS lists the pods' IPs)
    selecting that role's pods, on the port the pods serve HTTP."""
    from pdserve.serve import parse_discover

    c = _container(k8s[("Deployment", "pdserve-proxy")])
    env = {e["name"]: e.get("value") for e in c["env"]}
    entries = [parse_discover(x) for x in env["PDSERVE_DISCOVER"].split(",")]
    assert sorted(role for role, _, _ in entries) == ["decode", "prefill"]
    for role, host, port in entries:
        svc = k8s[("Service", host)]
        assert svc["spec"]["clusterIP"] == "None"
        pod = k8s[("Deployment", f"pdserve-{role}")]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in _container(
            k8s[("Deployment", f"pdserve-{role}")])["ports"]}
        assert ports["http"] == port


# ---- Prometheus and Grafana against the exported metrics ----------------------------------

def _exported() -> dict[str, set[str]]:
    """Every exposed sample name -> label names, from the metrics the product registers."""
    from prometheus_client import REGISTRY

    import pdserve.kv_transfer.metrics  # noqa: F401
    import pdserve.proxy.metrics  # noqa: F401
    import pdserve.service.metrics  # noqa: F401 - worker metrics

    out: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - test introspection
        labels = set(getattr(collector, "_labelnames", ()))
        for metric in collector.describe() if hasattr(collector, "describe") else []:
            for sfx in suffixes.get(metric.type, []):
                out[metric.name + sfx] = labels | ({"le"} if sfx == "_bucket" else set())
    return out


REQUIRED = [
    "pdserve_proxy_time_to_first_token_seconds", "pdserve_proxy_token2_latency_seconds",
    "pdserve_proxy_inter_token_latency_seconds", "pdserve_proxy_e2e_request_latency_seconds",
    "pdserve_proxy_http_requests_total", "pdserve_proxy_routing_decisions_total",
    "pdserve_proxy_retries_total", "pdserve_proxy_failovers_total", "pdserve_proxy_worker_load",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "pdserve_time_to_first_token_seconds", "pdserve_inter_token_latency_seconds",
    "pdserve_num_preemptions_total", "kv_transfer_fallback_total", "kv_transfer_transfers_total",
    "kv_transfer_bytes_total", "kv_transfer_seconds", "kv_transfer_transport_downgrade_total",
    "kv_transfer_reservations_active",
]
# labels Prometheus adds (targets, relabeling) rather than the exporter
TARGET_LABELS = {"instance", "job", "component", "pod"}
_METRIC = re.compile(r"\b((?:pdserve_|kv_transfer_|vllm:)[A-Za-z0-9_:]*)")


def test_grafana_dashboard_queries_exported_metrics_and_labels() -> None:
    dash = json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())
    exported = _exported()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    used: set[str] = set()
    for p in panels:
        for t in p["targets"]:
            names = set(_METRIC.findall(t["expr"]))
            assert names, f"{p['title']}: no pdserve metric in {t['expr']!r}"
            for n in names:
                assert n in exported, f"{p['title']}: {n} is not exported"
            labels = set().union(*(exported[n] for n in names)) | TARGET_LABELS
            written = set(re.findall(r"by \(([^)]*)\)", t["expr"]))
            written = {w.strip() for group in written for w in group.split(",")}
            written |= set(re.findall(r"(\w+)=~?\"", t["expr"]))
            written |= set(re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")))
            assert written <= labels, f"{p['title']}: no label(s) {written - labels} on {names}"
            used |= {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(
                ("_bucket", "_sum", "_count")) else n for n in names}
    missing = [m for m in REQUIRED if m not in used]
    assert not missing, f"the dashboard shows none of {missing}"
    # layout: unique ids, panels inside the 24-column grid and not overlapping
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    assert dash["templating"]["list"][0]["type"] == "datasource"


def test_prometheus_scrapes_the_proxy_and_workers_where_they_listen() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    compose = load_compose({"PDSERVE_INTERNAL_TOKEN": "t"})["services"]
    targets = {t for name in ("pdserve-proxy", "pdserve-workers")
               for sc in jobs[name]["static_configs"] for t in sc["targets"]}
    expected = {f"{n}:{environment(compose[n])['PDSERVE_PORT']}" for n in ("proxy", "prefill",
                                                                          "decode")}
    assert targets == expected
    for name in ("pdserve-proxy", "pdserve-workers"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    k8s_job = jobs["pdserve-kubernetes-pods"]
    assert k8s_job["kubernetes_sd_configs"][0]["role"] == "pod"
    assert any("prometheus_io_scrape" in " ".join(r.get("source_labels", []))
               for r in k8s_job["relabel_configs"])
    for svc in compose.values():  # every compose service answers /metrics on PDSERVE_PORT
        assert command(svc)[0] == "pdserve"
