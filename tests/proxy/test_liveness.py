"""The proxy's data-path liveness, over real ZMQ sockets in one process: a WorkerLink pings a
ROUTER that plays a worker's step loop. Silent past the limit, the link is dead (requests
waiting on it fail over at once, retryable, blaming that worker) and the registry neither
routes to it nor counts it in what the proxy serves; answering again readmits it."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from pdserve.common import wire
from pdserve.common.wire import DATA_PATH
from pdserve.proxy.registry import Registry
from pdserve.proxy.workers import WorkerLink


class FakeLoop:
    """A worker's data-path socket that answers Ping with Pong while `answering`."""

    def __init__(self):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.answering, self.pings = True, 0
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self):
        while True:
            identity, frame = await self.sock.recv_multipart()
            msg = DATA_PATH.decode(frame)
            if isinstance(msg, wire.Ping):
                self.pings += 1
                if self.answering:
                    await self.sock.send_multipart([identity, DATA_PATH.encode(
                        wire.Pong(n=msg.n))])

    async def close(self):
        self.task.cancel()
        self.sock.close(0)
        self.ctx.term()


async def until(pred, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_a_silent_worker_is_ejected_and_readmitted_when_it_answers():
    async def main():
        worker = FakeLoop()
        link = WorkerLink(worker.address, silence_limit=0.6)
        reports, deaths = [], []
        link.on_report = lambda: reports.append(time.monotonic())
        link.on_dead = lambda: deaths.append(time.monotonic())
        try:
            await asyncio.sleep(1.0)
            assert link.alive and worker.pings >= 2  # pinged every 0.5 s, answered
            q = link.subscribe("r1")
            worker.answering = False  # frozen
            took = await until(lambda: not link.alive, 3.0)
            assert took <= 0.6 + 0.5 + 0.2
            assert len(deaths) == 1  # counted once (pdserve_proxy_worker_ejections)
            err = q.get_nowait()  # its request fails over at once
            assert isinstance(err, wire.Error) and err.retryable
            pings = worker.pings
            await asyncio.sleep(1.5)
            assert worker.pings - pings <= 3  # unanswered: once per silence limit, no pile-up
            worker.answering = True
            await until(lambda: link.alive, 2.0)
            assert reports  # woke the admission queue: room again
        finally:
            await link.close()
            await worker.close()
    asyncio.run(main())


def test_the_registry_routes_only_to_live_links_and_says_what_it_serves():
    async def main():
        worker = FakeLoop()
        reg = Registry({"prefill": ["http://p"], "decode": ["http://d"]})
        p, d = reg.workers
        for w, role in ((p, "prefill"), (d, "decode")):
            w.role, w.healthy = role, True
            w.link = WorkerLink(worker.address, silence_limit=0.6)
        try:
            await asyncio.sleep(0.2)
            assert reg.ready() and reg.serves() == "prefill/decode: 1 P + 1 D"
            p.healthy = False  # no P: D prefills by itself, the proxy still serves
            assert reg.ready() and reg.usable("decode") == [d]
            assert reg.serves().startswith("decode workers only")
            worker.answering = False
            await until(lambda: not d.link.alive, 3.0)
            assert reg.usable("decode") == [] and not reg.ready()
            assert reg.serves().startswith("nothing")
            assert d.snapshot()["data_path"].startswith("silent for")
        finally:
            for w in reg.workers:
                await w.link.close()
            await worker.close()
    asyncio.run(main())


def test_a_warming_worker_gets_no_link_and_no_traffic_until_its_health_says_ok():
    """/health 503 "warming" (the worker compiles its kernels): the registry shows it
    warming, with the reason, opens no data-path link to it (its loop is not running yet,
    so pings would eject it), and routes nothing there; once it answers 200 it is usable."""
    import httpx

    async def main():
        worker = FakeLoop()
        state = {"warming": True}

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/info":
                return httpx.Response(200, json={"role": "decode", "name": "d0", "compat": {},
                                                 "data_address": worker.address})
            if state["warming"]:
                return httpx.Response(503, json={"status": "warming", "role": "decode",
                                                 "reason": "warming up: compiling kernels"})
            return httpx.Response(200, json={"status": "ok", "role": "decode"})

        reg = Registry({"decode": ["http://d"]}, silence_limit=0.6)
        reg.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        (d,) = reg.workers
        try:
            for _ in range(3):
                await reg.check_all()
            assert d.status == "warming" and d.reason == "warming up: compiling kernels"
            assert d.link is None and worker.pings == 0 and not reg.ready()
            # its /info is known, but it is not admitted: a request now waits for the first
            # round's end (or gets the 503 with the reason) rather than finding no route
            assert d.info and not reg.admitted.is_set()
            assert reg.usable("decode") == [] and "warming up: d0" in reg.serves()
            assert d.snapshot()["status"] == "warming"
            state["warming"] = False
            await reg.check_all()
            assert d.status == "ok" and d.link is not None and reg.usable("decode") == [d]
            assert reg.admitted.is_set()
            await until(lambda: worker.pings >= 1, 2.0)
            assert "warming" not in reg.serves()
        finally:
            await reg.close()
            await worker.close()
    asyncio.run(main())


def test_a_request_whose_worker_never_answers_times_out_blaming_that_worker():
    """One timer per request: past its deadline the wait fails with a retryable WorkerError
    naming the link, though the worker's pings are answered (alive but not serving it)."""
    from pdserve.common.params import SamplingParams
    from pdserve.common.wire import RequestRecord
    from pdserve.proxy.workers import WorkerError, run_both

    async def main():
        worker = FakeLoop()  # answers pings only
        link = WorkerLink(worker.address, silence_limit=5.0)
        rec = RequestRecord("slow-1", [5, 6, 7], SamplingParams(max_tokens=4, seed=1))
        try:
            t0 = time.monotonic()
            gen = run_both(rec, link, timeout=0.4)
            try:
                await gen.__anext__()
                raise AssertionError("rows came from a worker that sends none")
            except WorkerError as e:
                assert "did not answer in time" in str(e) and e.retryable and e.link is link
            finally:
                await gen.aclose()
            assert 0.35 <= time.monotonic() - t0 < 2.0
            assert link.alive and "slow-1" not in link.queues  # unsubscribed, timer gone
        finally:
            await link.close()
            await worker.close()
    asyncio.run(main())
