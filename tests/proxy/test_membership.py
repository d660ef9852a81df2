"""The membership routes over a Registry (proxy/membership.py), in process: who may change
the list, what a join and a drain answer, and that an idle drained worker leaves at once.
(tests/e2e/test_elastic.py runs the same with real workers under load.)"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.testclient import TestClient

from pdserve.proxy.membership import add_membership_routes
from pdserve.proxy.registry import Registry

TOKEN = "t-5f1c9e7a2b4d8063"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def client(registry: Registry, **kw) -> TestClient:
    app = FastAPI()
    add_membership_routes(app, registry, TOKEN, **kw)
    return TestClient(app)


def test_join_then_drain_an_idle_worker_and_it_leaves() -> None:
    reg = Registry({"both": ["http://127.0.0.1:9100"]}, token=TOKEN)
    c = client(reg)
    r = c.post("/workers", json={"url": "http://127.0.0.1:9200/", "role": "decode"}, headers=AUTH)
    assert r.status_code == 201 and r.json()["url"] == "http://127.0.0.1:9200"
    assert r.json()["role"] == "decode" and r.json()["joined"] is True
    again = c.post("/workers", json={"url": "http://127.0.0.1:9200"}, headers=AUTH)
    assert again.status_code == 200  # known: the same worker
    assert [w["url"] for w in c.get("/workers").json()["workers"]] == [
        "http://127.0.0.1:9100", "http://127.0.0.1:9200"]
    r = c.post("/workers/http://127.0.0.1:9100/drain", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "draining"
    # nothing in flight on it: it left at once
    assert [w["url"] for w in c.get("/workers").json()["workers"]] == ["http://127.0.0.1:9200"]


def test_bad_requests_are_openai_shaped_and_change_nothing() -> None:
    reg = Registry({}, token=TOKEN)
    c = client(reg)
    cases = [({"url": "http://h:1"}, {}, 401, "invalid_internal_token"),
             ({"url": "http://h:1"}, {"authorization": "Bearer nope"}, 401,
              "invalid_internal_token"),
             ({"url": "h:1"}, AUTH, 400, None), ({"role": "both"}, AUTH, 400, None),
             ({"url": "http://h:1", "role": "chef"}, AUTH, 400, None)]
    for body, headers, status, code in cases:
        r = c.post("/workers", json=body, headers=headers)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["code"] == code
    assert c.post("/workers/nobody/drain", headers=AUTH).json()["error"]["code"] == \
        "unknown_worker"
    assert reg.workers == []
    several = client(Registry({}, token=TOKEN), several_processes=True)
    r = several.post("/workers", json={"url": "http://h:1"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "several_proxy_processes"


def test_discovery_follows_the_dns_records() -> None:
    """--discover decode=NAME:8200: each address NAME resolves to is a D; a new address
    joins, a vanished one drains (idle: it leaves at once), a failed lookup changes nothing,
    and an operator's drain is not undone by the name still listing the worker (only by the
    name dropping the address and listing it again: a new pod)."""
    import asyncio

    from pdserve.serve import parse_discover

    entry = parse_discover("decode=pods.example:8200")
    assert entry == ("decode", "pods.example", 8200)
    assert parse_discover("both=[fd00::1]:9") == ("both", "fd00::1", 9)
    reg = Registry({}, token=TOKEN, discover=[entry])
    records: list = [["10.0.0.1", "10.0.0.2"]]

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("pods.example", 8200)
        if isinstance(records[0], OSError):
            raise records[0]
        return records[0]
    reg.resolve = resolve

    def urls() -> list[str]:
        return sorted(w.url for w in reg.workers)

    async def rounds() -> None:
        await reg.discover_workers()
        assert urls() == ["http://10.0.0.1:8200", "http://10.0.0.2:8200"]
        assert {w.role for w in reg.workers} == {"decode"}
        records[0] = ["10.0.0.2", "fd00::3"]
        await reg.discover_workers()
        assert urls() == ["http://10.0.0.2:8200", "http://[fd00::3]:8200"]
        records[0] = OSError("no DNS")
        await reg.discover_workers()
        assert len(reg.workers) == 2
        busy = reg.find("http://10.0.0.2:8200")
        busy.active = 1  # a stream runs on it
        reg.start_drain(busy)  # an operator drains it
        records[0] = ["10.0.0.2", "fd00::3"]
        await reg.discover_workers()
        assert busy.drain and busy.drain_by == "operator"  # still listed, still draining
        busy.active = 0
        reg._leave_if_done(busy)  # (what the next health round does)
        assert urls() == ["http://[fd00::3]:8200"]
        await reg.discover_workers()  # listed still: not taken back after an operator's drain
        assert urls() == ["http://[fd00::3]:8200"]
        records[0] = ["fd00::3"]
        await reg.discover_workers()
        records[0] = ["10.0.0.2", "fd00::3"]  # gone from the records, then back: a new pod
        await reg.discover_workers()
        assert urls() == ["http://10.0.0.2:8200", "http://[fd00::3]:8200"]

    asyncio.run(rounds())


def test_a_non_json_body_is_a_400_and_close_leaves_no_task_behind() -> None:
    import asyncio

    reg = Registry({}, token=TOKEN)
    r = client(reg).post("/workers", content=b"{nope", headers={**AUTH,
                                                                "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "url"

    async def main() -> None:
        reg.start()
        reg.add("http://127.0.0.1:9")  # nobody there: its first check runs in the background
        assert reg._tasks
        await reg.close()
        assert not reg._tasks
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.sleep(0)
        assert all(t.done() for t in left), left

    asyncio.run(main())


def test_join_retries_until_the_proxy_answers_and_stops_when_refused() -> None:
    """A worker's --join: no proxy yet -> it tries again every second; a proxy that answers
    201 -> done; one that refuses (401) -> it says why and stops trying."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pdserve.worker import join_in_thread
    from tests.workers.cluster import free_port_block

    seen: list[tuple[int, dict]] = []
    servers: list[HTTPServer] = []

    def serve(port: int, status: int) -> None:
        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                seen.append((port, {**body, "auth": self.headers["authorization"]}))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a) -> None:
                pass
        srv = HTTPServer(("127.0.0.1", port), H)
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, daemon=True).start()

    ok_port, no_port = free_port_block(1), free_port_block(1)
    stop = threading.Event()
    try:
        t = join_in_thread(f"http://127.0.0.1:{ok_port}", "http://w:1", "decode", TOKEN, stop)
        time.sleep(1.5)  # the proxy is not up yet: the thread keeps trying
        assert t.is_alive() and not seen
        serve(ok_port, 201)
        t.join(5)
        assert not t.is_alive()
        assert seen == [(ok_port, {"url": "http://w:1", "role": "decode",
                                   "auth": f"Bearer {TOKEN}"})]
        serve(no_port, 401)
        t = join_in_thread(f"http://127.0.0.1:{no_port}", "http://w:1", "decode", TOKEN, stop)
        t.join(5)
        assert not t.is_alive() and len(seen) == 2  # refused once: no retries
    finally:
        stop.set()
        for srv in servers:
            srv.shutdown()
            srv.server_close()
