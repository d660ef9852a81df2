"""The deployment forms actually serving, as local processes (there is no Docker engine here):

1. deploy/docker-compose.yml's CPU profile: each service's `command` and `environment`,
   rewritten only by `helpers.localize` (service names -> 127.0.0.1, ports -> free ones),
   started in `depends_on` order, gated by the services' own healthchecks; a chat request
   goes through the proxy with the `openai` SDK, and its KV moves P -> D over shared memory.
2. The SageMaker form: `pdserve sagemaker` configured by SM_PDSERVE_* / SM_VLLM_* only, which
   execs `pdserve serve` with a local cluster; /ping answers 200 and /invocations a chat body.

Every process runs in its own process group and none survives the test (try/finally).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.deploy.helpers import (
    LocalProcess,
    clean_base_env,
    command,
    environment,
    group_alive,
    load_compose,
    local_argv,
    localize,
    run_healthcheck,
    start_local,
    stop_all,
    wait_until,
)
from tests.workers.cluster import free_port_block

pytestmark = pytest.mark.timeout(180)

TOKEN = "deploy-test-token"
API_KEY = "sk-deploy-test"
# a prompt long enough (after the chat template) to go through P, not only D
PROMPT = "Tell me, in a few words, what a disaggregated prefill and decode cluster does. " * 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PDSERVE_CACHE_DIR with the built-in model materialised once (no per-process race)."""
    from pdserve.engine.builtin_model import builtin_model_path

    path = tmp_path_factory.mktemp("pdserve-cache")
    builtin_model_path(path)
    return path


def _start_order(services: dict[str, Any]) -> list[str]:
    """Services in depends_on order (dependencies first)."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        assert name not in seen, f"depends_on cycle through {name}"
        for dep in services[name].get("depends_on") or {}:
            visit(dep, (*seen, name))
        if name not in order:
            order.append(name)

    for name in sorted(services):
        visit(name)
    return order


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_compose_cpu_profile_serves_as_local_processes(tmp_path: Path, cache_dir: Path) -> None:
    compose = load_compose({"PDSERVE_INTERNAL_TOKEN": TOKEN, "PDSERVE_API_KEY": API_KEY})
    services = {n: s for n, s in compose["services"].items() if "cpu" in s.get("profiles", [])}
    assert set(services) == {"proxy-cpu", "prefill-cpu", "decode-cpu"}
    ports = {n: (int(environment(s)["PDSERVE_PORT"]), free_port_block(3))
             for n, s in services.items()}
    test_only = {"PDSERVE_TORCH_THREADS": "1", "PDSERVE_CACHE_DIR": str(cache_dir)}
    procs: dict[str, LocalProcess] = {}
    t0 = time.monotonic()
    try:
        for name in _start_order(services):
            svc = services[name]
            for dep, cond in (svc.get("depends_on") or {}).items():
                if cond["condition"] == "service_healthy":
                    wait_until(lambda dep=dep: run_healthcheck(services[dep], procs[dep].env),
                               f"{dep} healthy", 120, procs.values())
            env = clean_base_env(localize(environment(svc), name, ports), test_only)
            procs[name] = start_local(name, local_argv(command(svc)), env, tmp_path)
        proxy = procs["proxy-cpu"]
        wait_until(lambda: run_healthcheck(services["proxy-cpu"], proxy.env), "proxy-cpu healthy",
                   120, procs.values())
        started = time.monotonic() - t0

        base = f"http://127.0.0.1:{ports['proxy-cpu'][1]}"
        client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
            temperature=0)
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):  # PDSERVE_API_KEY reached the proxy
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()

        # the request took the P -> D path and its KV moved over shared memory
        proxy_metrics = httpx.get(base + "/metrics", timeout=10).text
        assert _metric(proxy_metrics, "pdserve_proxy_routing_decisions_total", route="pd") >= 1
        d_port = ports["decode-cpu"][1]
        d_metrics = httpx.get(f"http://127.0.0.1:{d_port}/metrics", timeout=10).text
        assert _metric(d_metrics, "kv_transfer_transfers_total", role="decode", transport="shm",
                       outcome="done") >= 1, d_metrics
        assert _metric(d_metrics, "kv_transfer_transport_downgrade_total") == 0
        print(f"\ncompose cpu profile: healthy after {started:.1f} s, "
              f"request done at {time.monotonic() - t0:.1f} s")
    finally:
        p_pid = procs["prefill-cpu"].proc.pid if "prefill-cpu" in procs else None
        # the proxy first, as `docker compose down` stops dependents before dependencies
        killed = stop_all(sorted(procs.values(), key=lambda p: not p.name.startswith("proxy")))
        for p in procs.values():
            assert not group_alive(p.proc.pid), f"{p.name} left processes behind"
    assert not killed, f"needed SIGKILL: {killed}"
    if p_pid is not None:  # a graceful stop removes P's pool file from /dev/shm
        assert not list(Path("/dev/shm").glob(f"pdserve-kv-{p_pid}-*.pool"))


def test_sagemaker_form_serves_ping_and_invocations(tmp_path: Path, cache_dir: Path) -> None:
    port, worker_base = free_port_block(1), free_port_block(6)
    sm_env = {
        "SM_PDSERVE_HOST": "127.0.0.1",  # a test binds no public interface
        "SM_PDSERVE_PORT": str(port),  # overrides the 8080 default (last wins)
        "SM_PDSERVE_WORKER_BASE_PORT": str(worker_base),
        "SM_PDSERVE_TORCH_THREADS": "1",
        "SM_PDSERVE_KV_CACHE_MEMORY_BYTES": str(64 << 20),
        "SM_PDSERVE_MIN_PD_PROMPT_TOKENS": "0",
        "SM_VLLM_MAX_NUM_SEQS": "8",  # a vLLM name pdserve shares
        "SM_VLLM_DISABLE_LOG_STATS": "",  # a vLLM-only flag: dropped with a warning
        "SM_VLLM_TENSOR_PARALLEL_SIZE": "1",  # --tensor-parallel-size 1: one rank each
    }
    # TMPDIR: where `pdserve serve` puts its local cluster's logs
    env = clean_base_env({"PDSERVE_CACHE_DIR": str(cache_dir), "TMPDIR": str(tmp_path)}, sm_env)
    # SageMaker starts the image as `docker run IMAGE serve`
    proc = start_local("sagemaker", [sys.executable, "-m", "pdserve", "sagemaker", "serve"],
                       env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        def ping() -> bool:
            try:
                return httpx.get(base + "/ping", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ping, "/ping 200", 150, [proc])
        started = time.monotonic() - t0
        r = httpx.post(base + "/invocations", timeout=60, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.post(base + "/ping", timeout=5).status_code == 200
        bad = httpx.post(base + "/invocations", timeout=10, json={"neither": 1})
        assert bad.status_code == 400
        print(f"\nsagemaker form: /ping 200 after {started:.1f} s, "
              f"invocation done at {time.monotonic() - t0:.1f} s")
    finally:
        killed = stop_all([proc])
        assert not group_alive(proc.proc.pid), "the local cluster left processes behind"
        if killed:  # a SIGKILLed P leaves its pool file; remove files of dead owners only
            from pdserve.common.shm_files import sweep_stale

            sweep_stale()
    worker_logs = {p.name: p.read_text(errors="replace")
                   for p in tmp_path.glob("pdserve-cluster-*/*.log")}
    assert not killed, (
        "`pdserve serve` died of SIGTERM before stopping its local cluster's workers (they "
        "needed SIGKILL): uvicorn re-raises the signal after its shutdown, so run_serve's "
        "`finally: stop_processes(procs)` never runs. Last worker log lines: "
        + str({n: t.strip().splitlines()[-1:] for n, t in worker_logs.items()}))
    # a clean stop takes the local cluster's temporary log folder with it
    assert not list(tmp_path.glob("pdserve-cluster-*")), "the cluster's log folder outlived it"
    log = proc.log.read_text(errors="replace")
    assert re.search(r"WARNING pdserve\.sagemaker: ignoring vLLM option\(s\).*--disable-log-stats",
                     log)
    assert "--port 8080 --max-num-seqs 8" in log and f"--port {port}" in log  # exec line
