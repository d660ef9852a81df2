"""The proxy's admission queue with no workers: room as a switch the test flips. Requests wait
in priority order without overtaking, are woken by events, and get 429 with Retry-After when
the queue is full or their deadline passes; a request that cannot be served at all is not a
429."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.proxy.admission import Admission, OverloadedError
from pdserve.proxy.backend import BackendError


class Room:
    """`try_route` for the test: a slot while `free` > 0 (taking it), else None; `release`
    gives a slot back."""

    def __init__(self, free: int = 0):
        self.free, self.order = free, []

    def release(self, name: str) -> None:
        self.free += 1
        self.order.remove(name)

    def route(self, name: str):
        def take():
            if self.free <= 0:
                return None
            self.free -= 1
            self.order.append(name)
            return name
        return take


def test_priority_order_without_overtaking():
    async def main():
        adm, room = Admission(max_queued=10, max_delay=5), Room()
        deadline = time.monotonic() + 5
        tasks = [asyncio.create_task(adm.admit(prio, deadline, room.route(name), room.release))
                 for name, prio in (("late-normal", 0), ("urgent", -5), ("background", 9),
                                    ("normal", 0))]
        await asyncio.sleep(0.01)
        assert adm.waiting == 4 and room.order == []
        room.free = 2
        adm.wake()  # an event: a load report, a request ending
        await asyncio.sleep(0.01)
        assert room.order == ["urgent", "late-normal"]  # priority, then arrival
        room.free = 5
        adm.wake()
        assert await asyncio.gather(*tasks) == ["late-normal", "urgent", "background", "normal"]
        assert room.order == ["urgent", "late-normal", "normal", "background"]
        assert adm.waiting == 0
    asyncio.run(main())


def test_full_queue_and_deadline_give_429_with_retry_after():
    async def main():
        adm, room = Admission(max_queued=2, max_delay=3), Room()
        deadline = time.monotonic() + 0.2
        waiting = [asyncio.create_task(adm.admit(0, deadline, room.route(f"w{i}"), room.release))
                   for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError) as full:
            await adm.admit(0, deadline, room.route("third"), room.release)
        assert full.value.status_code == 429 and full.value.headers == {"Retry-After": "3"}
        assert "2 requests are waiting" in str(full.value)
        t0 = time.monotonic()
        for t in waiting:
            with pytest.raises(OverloadedError, match="within 3 s"):
                await t
        assert 0.1 < time.monotonic() - t0 < 1.0 and adm.waiting == 0
        room.free = 1  # room again: the next request goes at once
        assert await adm.admit(0, time.monotonic() + 1, room.route("next"), room.release) == "next"
    asyncio.run(main())


def test_no_worker_at_all_is_not_an_overload():
    async def main():
        adm = Admission(max_queued=2, max_delay=3)

        def no_worker():
            raise BackendError("no healthy worker can serve this request")

        with pytest.raises(BackendError) as e:
            await adm.admit(0, time.monotonic() + 1, no_worker, print)
        assert not isinstance(e.value, OverloadedError)
        gone = []

        def route():  # no room; then its workers die while it waits
            if gone:
                raise BackendError("the workers went away")
            return None

        waiter = asyncio.create_task(adm.admit(0, time.monotonic() + 1, route, print))
        await asyncio.sleep(0.01)
        gone.append(True)
        adm.wake()
        with pytest.raises(BackendError, match="went away"):
            await waiter
        assert adm.waiting == 0
    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_queue():
    async def main():
        adm, room = Admission(max_queued=4, max_delay=5), Room()
        t = asyncio.create_task(adm.admit(0, time.monotonic() + 5, room.route("gone"), room.release))
        await asyncio.sleep(0.01)
        t.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await t
        room.free = 1
        adm.wake()
        assert adm.waiting == 0 and room.order == []  # the slot was not taken for it
        assert await adm.admit(0, time.monotonic() + 1, room.route("next"), room.release) == "next"
    asyncio.run(main())


def test_a_route_taken_for_a_waiter_cancelled_before_it_ran_is_released():
    async def main():
        adm, room = Admission(max_queued=4, max_delay=5), Room()
        t = asyncio.create_task(adm.admit(0, time.monotonic() + 5, room.route("late"),
                                          room.release))
        await asyncio.sleep(0.01)
        room.free = 1
        adm.wake()  # the slot is taken for it ...
        assert room.order == ["late"]
        t.cancel()  # ... and its client leaves before the task resumes
        with pytest.raises(asyncio.CancelledError):
            await t
        assert room.order == [] and room.free == 1 and adm.waiting == 0
    asyncio.run(main())


def test_a_links_count_of_unacknowledged_requests():
    """WorkerLink counts what it sent beyond the worker's latest "acked"; a restarted worker
    (new epoch) starts the count over; a worker that does not count resets it per report."""
    from pdserve.common import wire
    from pdserve.common.params import SamplingParams
    from pdserve.common.wire import RequestRecord
    from pdserve.proxy.workers import WorkerLink

    async def main():
        link = WorkerLink("tcp://127.0.0.1:9", "t")  # nothing listens: sends queue in zmq
        try:
            link.routed["a"] = 5
            assert link.in_flight() == (1, 5)
            for rid in ("a", "b", "c"):
                link.send(wire.Prefill(rec=RequestRecord(rid, [1] * 5,
                                                         SamplingParams(seed=1))))
            assert link.routed == {} and link.in_flight() == (3, 15)
            link._acknowledge({"acked": 2, "acked_tokens": 10, "epoch": 1})
            assert link.in_flight() == (1, 5)  # "c" is on its way
            link.send(wire.Prefill(rec=RequestRecord("d", [1] * 5, SamplingParams(seed=1))))
            link._acknowledge({"acked": 4, "acked_tokens": 20, "epoch": 1})
            link._acknowledge({"acked": 4, "acked_tokens": 20, "epoch": 1})  # no news
            assert link.in_flight() == (0, 0)
            link.send(wire.Prefill(rec=RequestRecord("e", [1] * 5, SamplingParams(seed=1))))
            link.send(wire.Prefill(rec=RequestRecord("f", [1] * 5, SamplingParams(seed=1))))
            link._acknowledge({"acked": 5, "acked_tokens": 25, "epoch": 1})
            assert link.in_flight() == (1, 5)  # "f" is still on its way
            link._acknowledge({"acked": 0, "acked_tokens": 0, "epoch": 2})  # restarted
            assert link.in_flight() == (0, 0)
            link.send(wire.Prefill(rec=RequestRecord("g", [1] * 5, SamplingParams(seed=1))))
            link._acknowledge({"num_requests_running": 0})  # counts nothing: reset
            assert link.in_flight() == (0, 0)
        finally:
            await link.close()
    asyncio.run(main())


def test_waiting_for_a_worker_wakes_on_the_event_not_a_timer():
    """A request no worker can serve waits in `changed()`: a wake (a worker admitted or
    answering again) ends the wait at once; with none it ends at its timeout."""
    async def main():
        adm = Admission(max_queued=10, max_delay=5)
        t0 = time.monotonic()
        await adm.changed(0.05)
        assert 0.04 <= time.monotonic() - t0 < 0.5  # timed out: nothing happened
        waiter = asyncio.create_task(adm.changed(5.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        t1 = time.monotonic()
        adm.wake()
        await waiter
        assert time.monotonic() - t1 < 0.05
    asyncio.run(main())
