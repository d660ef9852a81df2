"""Scaling deploy/docker-compose.yml's decode service up and down under 64 streams, as local
processes (there is no Docker engine here): what

    docker compose -f deploy/docker-compose.yml --profile cpu up -d --scale decode-cpu=3
    docker compose -f deploy/docker-compose.yml --profile cpu up -d --scale decode-cpu=1

do, done with processes. Each replica runs the service's own command and environment
(`helpers.localize`: ports -> free ones, PDSERVE_HOST and PDSERVE_ADVERTISE_HOST=auto -> the
replica's own loopback address, 127.0.0.k, as a container has its own IP; every replica of
a service on the same port, as containers are). Docker's embedded DNS lists the running
replicas under the service name: here a JSON file the proxy's resolver reads
(tests/deploy/dns_stub.py wraps `pdserve serve`, replacing the name lookup only); a replica
is listed once started and unlisted once exited, as Docker does. Scaling down sends SIGTERM
to the replicas removed (the newest, as compose does) and waits for them.

64 client tasks (the `openai` SDK) send greedy requests one after another through all of
it. No request fails; every answer equals the offline engine's; the new replicas take
requests; the removed ones finish theirs, exit 0 and leave the proxy's list.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
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
from tests.stream_load import differing, prompts_and_answers, stream_while
from tests.workers.cluster import free_port_block

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TOKEN = "scaling-test-token"
STREAMS = 64
MAX_TOKENS = 32  # streams long enough that a replica stopped while it holds some still does
DNS_STUB = Path(__file__).with_name("dns_stub.py")


class Dns:
    """The stand-in for Docker's DNS: service name -> the running replicas' addresses."""

    def __init__(self, path: Path):
        self.path, self.names = path, {}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.names))
        tmp.replace(self.path)  # the proxy never reads half a file

    def list(self, name: str, address: str) -> None:
        self.names.setdefault(name, []).append(address)
        self._write()

    def unlist(self, name: str, address: str) -> None:
        self.names[name].remove(address)
        self._write()


def listed(proxy: str) -> dict[str, dict[str, Any]]:
    return {w["url"]: w for w in httpx.get(proxy + "/workers", timeout=5).json()["workers"]}


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_scaling_the_decode_service_up_and_down_loses_nothing(tmp_path: Path) -> None:
    compose = load_compose({"PDSERVE_INTERNAL_TOKEN": TOKEN})
    services = {n: s for n, s in compose["services"].items() if "cpu" in s.get("profiles", [])}
    ports = {n: (int(environment(s)["PDSERVE_PORT"]), free_port_block(3))
             for n, s in services.items()}
    dns = Dns(tmp_path / "dns.json")
    test_only = {"PDSERVE_TORCH_THREADS": "1", "PDSERVE_KV_CACHE_MEMORY_BYTES": str(64 << 20),
                 "STUB_DNS_FILE": str(dns.path)}
    names = {"decode-cpu": "decode-cpu"}  # resolved by the stand-in DNS: several replicas
    d_port = ports["decode-cpu"][1]
    procs: dict[str, LocalProcess] = {}

    def start_decode(k: int) -> str:
        """Replica k of decode-cpu at 127.0.0.(k+1), listed in the DNS once started."""
        ip = f"127.0.0.{k + 1}"
        env = clean_base_env(localize(environment(services["decode-cpu"]), "decode-cpu",
                                      ports, host=ip, names=names), test_only)
        procs[f"decode-cpu-{k}"] = start_local(f"decode-cpu-{k}",
                                               local_argv(command(services["decode-cpu"])),
                                               env, tmp_path)
        dns.list("decode-cpu", ip)
        return f"http://{ip}:{d_port}"

    try:
        env = clean_base_env(localize(environment(services["prefill-cpu"]), "prefill-cpu",
                                      ports, names=names), test_only)
        procs["prefill-cpu"] = start_local("prefill-cpu",
                                           local_argv(command(services["prefill-cpu"])),
                                           env, tmp_path)
        d1 = start_decode(1)
        for name, url in (("prefill-cpu", f"http://127.0.0.1:{ports['prefill-cpu'][1]}"),
                          ("decode-cpu-1", d1)):
            wait_until(lambda url=url: healthy(url), f"{name} healthy", 120, procs.values())
        svc = services["proxy-cpu"]
        env = clean_base_env(localize(environment(svc), "proxy-cpu", ports, names=names),
                             test_only)
        assert env["PDSERVE_DISCOVER"] == \
            f"prefill=127.0.0.1:{ports['prefill-cpu'][1]},decode=decode-cpu:{d_port}"
        argv = command(svc)
        procs["proxy-cpu"] = start_local("proxy-cpu", [*local_argv(argv)[:1], str(DNS_STUB),
                                                       *argv[1:]], env, tmp_path)
        wait_until(lambda: run_healthcheck(svc, env), "proxy-cpu healthy", 120, procs.values())
        proxy = f"http://127.0.0.1:{ports['proxy-cpu'][1]}"
        assert set(listed(proxy)) == {d1, f"http://127.0.0.1:{ports['prefill-cpu'][1]}"}

        prompts, want = prompts_and_answers(1, STREAMS * 3, (20, 60), MAX_TOKENS)
        def wait(pred, what: str, timeout: float) -> Any:
            """Until pred(); failing at once if a replica not stopped on purpose exits."""
            running = [p for p in procs.values() if p.proc.poll() is None]
            return asyncio.to_thread(wait_until, pred, what, timeout, running)

        async def operate() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            await asyncio.sleep(1.0)  # the streams run on decode-cpu-1
            # --scale decode-cpu=3: two replicas start; Docker lists them at once
            t0 = time.monotonic()
            new = [start_decode(2), start_decode(3)]
            for url in new:
                await wait(lambda url=url: listed(proxy).get(url, {}).get("active", 0) > 0,
                           f"{url} taking requests", 120)
            seen["scale_up_s"] = time.monotonic() - t0
            # --scale decode-cpu=1: compose stops the newest replicas (SIGTERM, then waits);
            # each is stopped while it holds streams, so its drain has some to finish
            for k, url in ((3, new[1]), (2, new[0])):
                await wait(lambda url=url: listed(proxy)[url]["active"] >= 2,
                           f"{url} holding streams", 30)
                procs[f"decode-cpu-{k}"].proc.send_signal(signal.SIGTERM)
            for k, url in ((3, new[1]), (2, new[0])):
                p = procs[f"decode-cpu-{k}"].proc
                await asyncio.to_thread(p.wait, 60)
                seen[f"exit_{k}"] = p.returncode
                dns.unlist("decode-cpu", url.removeprefix("http://").split(":")[0])
            for url in new:
                await wait(lambda url=url: url not in listed(proxy), f"{url} leaving", 30)
            await asyncio.sleep(1.0)  # decode-cpu-1 serves on
            return seen

        got, failures, seen = asyncio.run(stream_while(proxy, prompts, STREAMS, MAX_TOKENS,
                                                       operate))
        assert not failures, failures[:5]
        assert len(got) > 2 * STREAMS, len(got)
        wrong = differing(got, want)
        assert not wrong, f"{len(wrong)} answers differ from the offline engine: {wrong[:5]}"
        assert seen["exit_2"] == 0 and seen["exit_3"] == 0, seen
        drained = 0  # requests the removed replicas had in flight when SIGTERM came
        lines = []
        for k in (2, 3):
            log = procs[f"decode-cpu-{k}"].log.read_text()
            m = re.search(r"draining \(SIGTERM\): (\d+) request\(s\) in flight", log)
            assert m, log[-2000:]
            drained += int(m.group(1))
            lines.append(m.group(0))
            assert "drained: nothing in flight; stopping" in log  # finished, no timeout
        # each was stopped while the proxy counted >= 2 streams on it (a replica may just have
        # finished them, as the proxy learns of it a frame later, but not both)
        assert drained > 0, (lines, seen)
        assert set(listed(proxy)) == {d1, f"http://127.0.0.1:{ports['prefill-cpu'][1]}"}
        routed = httpx.get(proxy + "/metrics", timeout=10).text
        for url in (d1, *(f"http://127.0.0.{k + 1}:{d_port}" for k in (2, 3))):
            assert f'worker="{url}"' in routed, url  # each replica served requests
        print(f"\nscaled up in {seen['scale_up_s']:.1f} s; {len(got)} requests, none failed")
    finally:
        killed = stop_all(sorted(procs.values(), key=lambda p: not p.name.startswith("proxy")))
        for p in procs.values():
            assert not group_alive(p.proc.pid), f"{p.name} left processes behind"
    assert not killed, f"needed SIGKILL: {killed}"
