"""Overload control at the proxy: a request goes to the workers only when one has room for it
(`Worker.has_room`: P's pending prefill under one step's token budget, D's and both-role
workers' sequences under max_num_seqs); until then it waits here, in priority order (vLLM's
`priority`, lower first, then arrival) and without overtaking, until its deadline. A full
queue or a passed deadline is a 429 with Retry-After, never a hang. Waiters are woken by
events (a worker's load report, a request ending), not by a timer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

from pdserve.proxy import metrics
from pdserve.proxy.backend import BackendError


class OverloadedError(BackendError):
    """Every worker is busy and the queue is full or waited too long: 429, retry later."""

    status_code = 429

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}


class Admission:
    """The queue of requests waiting for room; one per proxy process."""

    def __init__(self, max_queued: int, max_delay: float):
        self.max_queued = max_queued
        self.max_delay = max_delay
        self._order = itertools.count()
        self.waiting = 0  # requests in the queue now
        # (priority, arrival, future of the route, try_route: the route now, or None)
        self._heap: list[tuple[int, int, asyncio.Future, Callable[[], Any]]] = []
        self._changed: asyncio.Event | None = None  # set by the next wake() (`changed`)

    async def admit(self, priority: int, deadline: float, try_route: Callable[[], Any],
                    release: Callable[[Any], None]) -> Any:
        """A route for one request (what `try_route` returns once it returns one), waiting
        until `deadline` (time.monotonic()) at most. `try_route` may raise BackendError (no
        worker can serve at all): that reaches the caller as is. A route taken for a waiter
        that is cancelled meanwhile (its client left) is handed to `release`."""
        if not self._heap and (route := try_route()) is not None:
            metrics.QUEUE_TIME.observe(0.0)
            return route
        t0 = time.monotonic()
        if self.waiting >= self.max_queued:
            metrics.REJECTED.labels("queue_full").inc()
            raise OverloadedError(f"the server is overloaded: {self.waiting} requests are "
                                  "waiting for a worker; retry later", self.max_delay)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        heapq.heappush(self._heap, (priority, next(self._order), fut, try_route))
        self.waiting += 1
        metrics.QUEUED.set(self.waiting)
        # Our own timer, not asyncio.wait_for: on Python 3.11 wait_for swallows a
        # cancellation that lands after the route was taken, serving a client that has left.
        timer = loop.call_at(max(loop.time(), deadline - time.monotonic() + loop.time()),
                             self._expire, fut)
        self.wake()
        try:
            route = await fut
            metrics.QUEUE_TIME.observe(time.monotonic() - t0)
            return route
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                release(fut.result())
            raise
        finally:
            timer.cancel()
            self.waiting -= 1
            metrics.QUEUED.set(self.waiting)

    def _expire(self, fut: asyncio.Future) -> None:
        if not fut.done():
            metrics.REJECTED.labels("queue_timeout").inc()
            fut.set_exception(OverloadedError(
                "the server is overloaded: no worker had room for this request within "
                f"{self.max_delay:g} s; retry later", self.max_delay))

    async def changed(self, timeout: float) -> None:
        """Until the next `wake()` (a load report, a worker admitted or answering again, a
        request ending) or `timeout` seconds: how a request that no worker can serve at all
        waits for one, with no polling."""
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    def wake(self) -> None:
        """Route waiters, first in line first, while workers have room."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        while self._heap:
            _, _, fut, try_route = self._heap[0]
            if not fut.done():
                try:
                    route = try_route()
                except BackendError as e:
                    fut.set_exception(e)
                    route = None
                else:
                    if route is None:
                        return  # no overtaking: the first in line waits for room
                    fut.set_result(route)
            heapq.heappop(self._heap)
